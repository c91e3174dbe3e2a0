"""The pipeline flow: the dvc.yaml stages as Prefect tasks, in DVC's order, with retries; ``sslcook run``.

DVC owns the DAG and the caching; this flow only runs it. The stage list comes from DVC's planner (foreach
expanded: one task per ``pretrain@simclr``), and each task is ``dvc repro --single-item <stage>``, so DVC's
up-to-date check decides: an unchanged stage is skipped, and the resulting dvc.lock is the one ``dvc repro``
writes. What DVC did with a stage (ran, restored from its run cache, skipped) is read from ``dvc status`` before
it and its dvc.lock entry after. A failing stage is retried (``flow.retries`` / ``flow.retry_delay_seconds`` in
params.yaml); a stage that keeps failing fails the run with its name and the tail of its log, and DVC leaves the
stages before it recorded in dvc.lock (``dvc status`` lists what is stale). At the end the flow publishes Prefect
artifacts: the report's own summary (reports/summary.md) with the data version, git commit and flow run, the
stage outcomes, and where the report and the exported backbones are.

The run sequence (workspace lock, raw data, ``dvc pull``, the stages, ``dvc push``, results) is written once
(``run_sequence``); a runner decides whether each step is a Prefect task or a plain call:

    sslcook run                       # the whole pipeline, in-process (a temporary Prefect server, no setup)
    sslcook run --stage evaluate      # evaluate@* and what they depend on
    sslcook run --no-prefect          # the same sequence as plain calls: no Prefect server, no artifacts

Both first validate the whole params.yaml (``validate_params``): DVC removes a stage's outputs before it runs
the stage, so a value the stage would refuse must never reach DVC.

From Python: ``from flows.pipeline import pipeline_flow; pipeline_flow(workspace="path/to/ws")``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flows.dvcops import (
    StageFailed,
    lock_changed,
    log_path_for,
    plan_stages,
    prefect_defaults,
    remotes,
    resolve_root,
    run_dvc,
    stage_env,
    stage_outcome,
    stage_state,
    workspace_lock,
)

prefect_defaults()
from prefect import flow, get_run_logger, task  # noqa: E402  (after prefect_defaults)
from prefect.cache_policies import NO_CACHE  # noqa: E402

from stages.workspace.common import DataError, SslcookError  # noqa: E402
from stages.workspace.config.flow import FlowConfig  # noqa: E402
from stages.workspace.lineage import data_version, git_info  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Params: checked whole before DVC runs anything.

_SSLCOOK_STAGE = re.compile(r"python -m stages\.")


def validate_params(root: Path) -> None:
    """Validate params.yaml as the sslcook stages will read it (``stages.pretrain.check_params``), before DVC
    starts. A workspace whose dvc.yaml runs none of them (a pipeline of one's own driven by these flows) keeps
    its own params format: only its ``flow`` section is read."""
    dvc_yaml = root / "dvc.yaml"
    if _SSLCOOK_STAGE.search(dvc_yaml.read_text() if dvc_yaml.is_file() else ""):
        from stages.pretrain import check_params

        check_params(root)


# ---------------------------------------------------------------------------------------------------------------
# Raw data: a fresh clone has data.dvc but no data/raw.


def _tracked_raw(root: Path) -> Path | None:
    dvcfile = root / "data.dvc"
    if not dvcfile.exists():
        return None
    try:
        out = (yaml.safe_load(dvcfile.read_text()) or {})["outs"][0]["path"]
    except (KeyError, IndexError, TypeError, yaml.YAMLError):
        raise DataError(f"{dvcfile}: not a DVC file with one output") from None
    return (root / out).resolve()


def ensure_raw_data(root: Path, *, echo: bool = False) -> str | None:
    """Materialise the raw data that data.dvc records when it is missing; say how (None: nothing to do).

    The exact version comes back from the DVC cache or the remote when they have it; otherwise the source named
    in params.yaml (``data.source``, default mnist5k, byte-deterministic) is ingested again.
    """
    raw = _tracked_raw(root)
    if raw is None or raw.exists():
        return None
    recorded = data_version(root)
    env = stage_env(root)
    log = log_path_for(root, "data-materialise")
    if run_dvc(["checkout", "data.dvc"], root, env=env, log_path=log).returncode == 0 and raw.exists():
        return f"restored data version {recorded} from the DVC cache"
    if remotes(root):
        if (
            run_dvc(["pull", "data.dvc"], root, env=env, log_path=log, append=True, echo=echo).returncode == 0
            and raw.exists()
        ):
            return f"pulled data version {recorded} from the DVC remote"
    from stages.workspace.ingest import ingest

    result = ingest(root=root)  # the source params.yaml names (data.source, data.path)
    if recorded and result.data_version != recorded:
        return (
            f"ingested {result.source} into {raw.relative_to(root)}: data version {result.data_version} "
            f"differs from the {recorded} that data.dvc recorded (data.dvc updated; commit it, or restore "
            "the data of that version with `dvc pull`)"
        )
    return f"ingested {result.source} into {raw.relative_to(root)} (data version {result.data_version})"


# ---------------------------------------------------------------------------------------------------------------
# What a run produced: the report's own summary, where the report and the exported backbones are.

SUMMARY = "reports/summary.md"  # written by the report stage; the results artifact publishes it as it is
REPORT_CANDIDATES = ("reports/summary.html", SUMMARY)


def find_outputs(root: Path) -> tuple[str | None, list[str]]:
    report = next((c for c in REPORT_CANDIDATES if (root / c).is_file()), None)
    backbones = sorted(str(p.relative_to(root)) for p in (root / "models").glob("*/backbone.safetensors"))
    return report, backbones


def results_markdown(
    root: Path, *, flow_run_id: str | None = None, report: str | None = None, backbones: list[str] | None = None
) -> str:
    """The run's facts (data version, commit, flow run, outputs), then reports/summary.md as the report wrote it."""
    git = git_info(root)
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    lines = [
        f"- data version: `{data_version(root) or 'untracked'}`",
        f"- git commit: `{git.get('commit') or 'not a git checkout'}`{dirty}",
    ]
    if flow_run_id:
        lines.append(f"- flow run: `{flow_run_id}`")
    lines.append(f"- report: `{report}`" if report else "- report: not produced")
    if backbones:
        lines.append("- exported backbones: " + ", ".join(f"`{b}`" for b in backbones))
    summary = root / SUMMARY
    body = summary.read_text() if summary.is_file() else f"No {SUMMARY} yet (the report stage writes it).\n"
    return "\n".join(lines) + "\n\n" + body


# ---------------------------------------------------------------------------------------------------------------
# The steps of a run, as plain functions: the Prefect tasks below wrap them, `--no-prefect` calls them directly.


def sync_remote(root: Path, command: str, echo: bool = False) -> None:
    """``dvc pull`` (missing outputs tolerated) or ``dvc push`` against the configured remote."""
    args = ["pull", "--allow-missing"] if command == "pull" else ["push"]
    result = run_dvc(args, root, log_path=log_path_for(root, f"dvc-{command}"), echo=echo)
    if result.returncode != 0:
        raise SslcookError(f"dvc {command} failed (exit {result.returncode}):\n{result.tail}")


def run_stage_once(
    root: Path,
    stage: str,
    *,
    force: bool = False,
    attempt: int = 1,
    final_attempt: int = 1,
    tail_lines: int = 30,
    echo: bool = False,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``: DVC runs it, or skips it when nothing it depends on changed.
    What DVC did is read from its status before and its dvc.lock entry after, not from its log."""
    log = log_path_for(root, stage)
    before = stage_state(root, stage)
    started = time.monotonic()
    result = run_dvc(
        ["repro", "--single-item", stage, *(["--force"] if force else [])],
        root,
        env=stage_env(root, flow_run_id),
        log_path=log,
        echo=echo,
        tail_lines=tail_lines,
        append=attempt > 1,
    )
    seconds = round(time.monotonic() - started, 2)
    if result.returncode != 0:
        if attempt >= final_attempt:
            tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
        else:
            tries = f"(attempt {attempt} of {final_attempt}, will retry)"
        raise StageFailed(
            f"stage {stage!r} failed {tries}, dvc exit code {result.returncode}; the stages before it "
            f"are recorded in dvc.lock, `dvc status` lists what is stale. "
            f"Last lines of {log.relative_to(root)}:\n{result.tail}"
        )
    return {
        "stage": stage,
        "outcome": stage_outcome(stage, before, force),
        "seconds": seconds,
        "attempts": attempt,
        "lock": "updated" if lock_changed(root, stage, before) else "unchanged",
        "log": str(log.relative_to(root)),
    }


@task(name="dvc-stage", cache_policy=NO_CACHE)
def run_stage(
    workspace: str, stage: str, force: bool = False, final_attempt: int = 1, tail_lines: int = 30, echo: bool = False
) -> dict[str, Any]:
    """:func:`run_stage_once` as a Prefect task: Prefect counts the attempts and retries."""
    from prefect.runtime import flow_run, task_run

    return run_stage_once(
        Path(workspace),
        stage,
        force=force,
        attempt=int(task_run.run_count or 1),
        final_attempt=final_attempt,
        tail_lines=tail_lines,
        echo=echo,
        flow_run_id=flow_run.id,
    )


@task(name="dvc-sync", cache_policy=NO_CACHE)
def dvc_sync(workspace: str, command: str, echo: bool = False) -> None:
    sync_remote(Path(workspace), command, echo)


def _publish(root: Path, results: list[dict[str, Any]], flow_run_id: str | None) -> dict[str, Any]:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    report, backbones = find_outputs(root)
    markdown = results_markdown(root, flow_run_id=flow_run_id, report=report, backbones=backbones)
    create_markdown_artifact(
        markdown=markdown, key="sslcook-results", description="the report's summary, data version, git commit, outputs"
    )
    if results:
        create_table_artifact(table=results, key="sslcook-stages", description="what DVC did with each stage")
    if report:
        create_link_artifact(
            link=(root / report).as_uri(), link_text=report, key="sslcook-report", description="the pipeline report"
        )
    return {"report": report, "backbones": backbones, "markdown": markdown}


# ---------------------------------------------------------------------------------------------------------------
# The run sequence, written once: lock, data, pull, the stages in DVC's order, push, results. A runner says how
# each step runs: a plain call (`--no-prefect`) or a Prefect task with Prefect's retries and artifacts.


class PlainRunner:
    """Each step a plain call; a failing stage is retried as the flow's tasks are (``flow.retries``)."""

    what = "sslcook run --no-prefect"

    def __init__(self, root: Path, config: FlowConfig, echo: bool = True):
        self.root, self.config, self.echo = root, config, echo
        self.flow_run_id: str | None = None

    def say(self, message: str) -> None:
        print(message, file=sys.stderr)

    def sync(self, command: str) -> None:
        sync_remote(self.root, command, self.echo)

    def stage(self, name: str, force: bool) -> dict[str, Any]:
        final, attempt = self.config.retries + 1, 1
        while True:
            try:
                return run_stage_once(
                    self.root,
                    name,
                    force=force,
                    attempt=attempt,
                    final_attempt=final,
                    tail_lines=self.config.log_tail_lines,
                    echo=self.echo,
                )
            except StageFailed as exc:
                if attempt >= final:
                    raise
                self.say(str(exc).splitlines()[0])
                time.sleep(self.config.retry_delay_seconds)
                attempt += 1

    def publish(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        report, backbones = find_outputs(self.root)
        return {
            "report": report,
            "backbones": backbones,
            "markdown": results_markdown(self.root, report=report, backbones=backbones),
        }


class PrefectRunner(PlainRunner):
    """Each step a Prefect task of the running flow: Prefect retries, logs and keeps the artifacts."""

    what = "sslcook pipeline flow"

    def __init__(self, root: Path, config: FlowConfig, echo: bool = False):
        from prefect.runtime import flow_run

        super().__init__(root, config, echo)
        self.flow_run_id = str(flow_run.id) if flow_run.id else None
        self.logger = get_run_logger()

    def say(self, message: str) -> None:
        self.logger.info("%s", message)

    def sync(self, command: str) -> None:
        dvc_sync.with_options(retries=self.config.retries, retry_delay_seconds=self.config.retry_delay_seconds)(
            str(self.root), command, self.echo
        )

    def stage(self, name: str, force: bool) -> dict[str, Any]:
        stage_task = run_stage.with_options(
            name=name,
            task_run_name=name,
            retries=self.config.retries,
            retry_delay_seconds=self.config.retry_delay_seconds,
        )
        result = stage_task(str(self.root), name, force, self.config.retries + 1, self.config.log_tail_lines, self.echo)
        self.say(f"stage {name}: {result['outcome']} in {result['seconds']:.1f}s (attempt {result['attempts']})")
        return result

    def publish(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        return _publish(self.root, results, self.flow_run_id)


def _sync_plan(root: Path, config: FlowConfig, pull: bool | None, push: bool | None) -> tuple[bool, bool]:
    """Whether to pull and push: the flag when given, else params.yaml, and only with a remote configured."""
    want_pull = config.dvc_pull if pull is None else pull
    want_push = config.dvc_push if push is None else push
    have_remote = bool((want_pull or want_push) and remotes(root))
    return want_pull and have_remote, want_push and have_remote


def _unfinished(results: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """The stage table of a run that stopped: the stage it stopped in failed, the ones after it did not run."""
    done = {r["stage"] for r in results}
    rest = [name for name in order if name not in done]
    return results + [
        {
            "stage": name,
            "outcome": "failed" if i == 0 else "not run",
            "seconds": None,
            "attempts": None,
            "lock": None,
            "log": None,
        }
        for i, name in enumerate(rest)
    ]


def run_sequence(
    runner: PlainRunner,
    stages: list[str] | None = None,
    force: bool = False,
    pull: bool | None = None,
    push: bool | None = None,
    wait_minutes: float = 0.0,
) -> dict[str, Any]:
    """One run of the pipeline of ``runner.root``, each step through ``runner``; the summary of the run."""
    root, config = runner.root, runner.config
    with workspace_lock(
        root,
        runner.what,
        runner.flow_run_id,
        wait_seconds=wait_minutes * 60,
        on_wait=lambda who: runner.say(f"waiting for the workspace: {who} holds it"),
    ):
        materialised = ensure_raw_data(root, echo=runner.echo)
        if materialised:
            runner.say(materialised)
        want_pull, want_push = _sync_plan(root, config, pull, push)
        if want_pull:
            runner.sync("pull")
        order, selected = plan_stages(root, stages)
        forced = set(selected if stages else order) if force else set()
        runner.say("stages in DVC order: " + ", ".join(order))
        results: list[dict[str, Any]] = []
        try:
            for name in order:
                results.append(runner.stage(name, name in forced))
        except BaseException:
            try:  # publish how far the run came before the failure propagates
                runner.publish(_unfinished(results, order))
            except Exception as exc:  # the stage's failure is the error to report, not this one
                runner.say(f"could not publish the results of the failed run: {exc}")
            raise
        if want_push:
            runner.sync("push")
        published = runner.publish(results)
    git = git_info(root)
    return {
        "flow_run_id": runner.flow_run_id,
        "workspace": str(root),
        "stages": results,
        "materialised": materialised,
        "data_version": data_version(root),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        **published,
    }


@flow(name="sslcook-pipeline", description="Run the dvc.yaml pipeline stage by stage (DVC skips unchanged stages)")
def pipeline_flow(
    workspace: str | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    pull: bool | None = None,
    push: bool | None = None,
    echo: bool = False,
    wait_minutes: float = 0.0,
) -> dict[str, Any]:
    """Run the pipeline of ``workspace`` (default: $SSLCOOK_WORKSPACE or the current directory).

    ``stages``: stage names, foreach groups or items (their upstream stages come along, as with ``dvc repro``);
    ``force``: re-run the named stages (every stage when none is named) even when DVC sees no change;
    ``pull``/``push``: sync with the DVC remote (default: params.yaml ``flow.dvc_pull``/``flow.dvc_push``,
    only when a remote is configured); ``echo``: stream the stages' output to stderr; ``wait_minutes``: how long
    to wait for another run that holds the workspace before failing (scheduled deployments wait, the CLI not).
    """
    root = resolve_root(workspace)
    validate_params(root)  # before DVC, which deletes a stage's outputs before the stage could refuse a value
    runner = PrefectRunner(root, FlowConfig.from_workspace(root), echo)
    return run_sequence(runner, stages, force, pull, push, wait_minutes)


def run_plain(
    workspace: str | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    pull: bool | None = None,
    push: bool | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """The same run without Prefect: no server, no artifacts."""
    root = resolve_root(workspace)
    validate_params(root)
    return run_sequence(PlainRunner(root, FlowConfig.from_workspace(root), echo), stages, force, pull, push)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslcook run", description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", "-w", help="pipeline workspace (default: $SSLCOOK_WORKSPACE or the current dir)")
    p.add_argument(
        "--stage",
        "-s",
        action="append",
        dest="stages",
        metavar="NAME",
        help="run this stage (name, foreach group or stage@item) and its upstream; repeatable",
    )
    p.add_argument("--force", "-f", action="store_true", help="re-run the named stages (all when none is named)")
    p.add_argument("--no-prefect", action="store_true", help="the same run as plain calls: no Prefect, no artifacts")
    p.add_argument("--no-pull", action="store_true", help="skip `dvc pull` even when a remote is configured")
    p.add_argument("--no-push", action="store_true", help="skip `dvc push` even when a remote is configured")
    p.add_argument("--quiet", "-q", action="store_true", help="do not stream the stages' output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = {
        "workspace": args.workspace,
        "stages": args.stages,
        "force": args.force,
        "echo": not args.quiet,
        "pull": False if args.no_pull else None,
        "push": False if args.no_push else None,
    }
    if args.no_prefect:
        summary = run_plain(**options)
    else:
        validate_params(resolve_root(args.workspace))  # a bad value is one line, before Prefect starts a server
        summary = pipeline_flow(**options)
    width = max((len(r["stage"]) for r in summary["stages"]), default=5)
    print("\n".join(f"{r['stage']:<{width}}  {r['outcome']:<8} {r['seconds']:>8.1f}s" for r in summary["stages"]))
    print()
    print(summary["markdown"])
    return 0


if __name__ == "__main__":
    from stages.workspace.common import run_main

    run_main(lambda: sys.exit(main()))
