"""The pipeline flow: the dvc.yaml stages as Prefect tasks, in DVC's order, with retries; ``sslcook run``.

DVC owns the DAG and the caching; this flow only runs it. The stage list comes from DVC's planner (foreach
expanded: one task per ``pretrain@simclr``), and each task is ``dvc repro --single-item <stage>``, so DVC's
up-to-date check decides: an unchanged stage is skipped, and the resulting dvc.lock is the one ``dvc repro``
writes. A failing stage is retried (``flow.retries`` / ``flow.retry_delay_seconds`` in params.yaml); a stage that
keeps failing fails the flow with its name and the tail of its log, and DVC leaves the stages before it recorded
in dvc.lock (``dvc status`` lists what is stale). At the end the flow publishes Prefect artifacts: the metrics
per method and family with the data version and git commit, the stage outcomes, and where the report and the
exported backbones are.

    sslcook run                       # the whole pipeline, in-process (a temporary Prefect server, no setup)
    sslcook run --stage evaluate      # evaluate@* and what they depend on
    sslcook run --no-prefect          # plain `dvc repro`, same workspace lock and data preparation

Both first validate the whole params.yaml (``validate_params``): DVC removes a stage's outputs before it runs
the stage, so a value the stage would refuse must never reach DVC.

From Python: ``from flows.pipeline import pipeline_flow; pipeline_flow(workspace="path/to/ws")``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flows.dvcops import (StageFailed, log_path_for, plan_stages, prefect_defaults, remotes, resolve_root, run_dvc,
                          stage_env, stage_outcome, workspace_lock)

prefect_defaults()
from prefect import flow, get_run_logger, task  # noqa: E402  (after prefect_defaults)
from prefect.cache_policies import NO_CACHE  # noqa: E402

from stages.common import DataError, SslcookError  # noqa: E402
from stages.config.flow import FlowConfig  # noqa: E402
from stages.lineage import data_version, git_info  # noqa: E402

# metrics shown first in the table when a metrics file has them (stages/evaluate.py's names); the other top-level
# numbers follow; nested ones (baselines, pretraining summary) are in the report
PREFERRED_METRICS = ("linear_probe_top1", "knn_top1_k200", "knn_top1_k20", "knn_top5_k200", "rankme", "emb_std")
MAX_METRIC_COLUMNS = 10
REPORT_CANDIDATES = ("reports/summary.html", "reports/summary.md", "reports/index.html", "reports/report.md")


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
        if run_dvc(["pull", "data.dvc"], root, env=env, log_path=log, append=True, echo=echo).returncode == 0 \
                and raw.exists():
            return f"pulled data version {recorded} from the DVC remote"
    from stages.ingest import ingest

    result = ingest(root=root)   # the source params.yaml names (data.source, data.path)
    if recorded and result.data_version != recorded:
        return (f"ingested {result.source} into {raw.relative_to(root)}: data version {result.data_version} "
                f"differs from the {recorded} that data.dvc recorded (data.dvc updated; commit it, or restore "
                "the data of that version with `dvc pull`)")
    return f"ingested {result.source} into {raw.relative_to(root)} (data version {result.data_version})"


# ---------------------------------------------------------------------------------------------------------------
# What a run produced: metrics per method and family, the report, the exported backbones.

def _family(method: str) -> str:
    """The registry's family of a method whose metrics file does not say it ("?" for unknown names)."""
    import importlib.util

    spec = importlib.util.find_spec("ssl_models")   # finds the package without importing it (and torch)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not any((Path(loc) / "methods" / f"{method}.py").exists() for loc in locations):
        return "?"
    try:
        from ssl_models import registry

        return registry.get(method).family
    except Exception:  # a broken or renamed method must not fail the run's summary
        return "?"


def _numbers(doc: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in doc.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def collect_metrics(root: Path) -> list[dict[str, Any]]:
    """One row per metrics/<method>.json: method, family and its numeric values (lineage left out)."""
    rows = []
    for path in sorted((root / "metrics").glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        method = str(doc.get("method") or path.stem)
        family = str(doc.get("family") or _family(method))
        rows.append({"method": method, "family": family, "file": str(path.relative_to(root)),
                     "values": _numbers(doc), "primary": doc.get("primary_metric")})
    return rows


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The evaluation's headline metrics when the files have them, else every top-level number (toy pipelines)."""
    seen = {key for row in rows for key in row["values"]}
    headline = [key for key in PREFERRED_METRICS if key in seen]
    return headline or sorted(seen)[:MAX_METRIC_COLUMNS]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def metrics_markdown(root: Path, rows: list[dict[str, Any]], *, flow_run_id: str | None = None,
                     report: str | None = None, backbones: list[str] | None = None) -> str:
    git = git_info(root)
    commit = git.get("commit") or "not a git checkout"
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    lines = ["# sslcook pipeline results", "",
             f"- data version: `{data_version(root) or 'untracked'}`",
             f"- git commit: `{commit}`{dirty}"]
    if flow_run_id:
        lines.append(f"- flow run: `{flow_run_id}`")
    lines.append("")
    if rows:
        columns = _metric_columns(rows)
        with_primary = any(row["primary"] for row in rows)
        head = ["method", "family"] + (["primary metric"] if with_primary else []) + columns
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in sorted(rows, key=lambda r: (r["family"], r["method"])):
            cells = [row["method"], row["family"]]
            if with_primary:
                name = row["primary"]
                cells.append(f"{_fmt(row['values'].get(name))} ({name})" if name else "")
            cells += [_fmt(row["values"].get(c)) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("\nEvery number, the baselines and the curves: metrics/*.json and the report.")
    else:
        lines.append("No metrics/*.json yet.")
    lines += ["", f"- report: `{report}`" if report else "- report: not produced"]
    if backbones:
        lines.append("- exported backbones:")
        lines += [f"  - `{b}`" for b in backbones]
    return "\n".join(lines) + "\n"


def find_outputs(root: Path) -> tuple[str | None, list[str]]:
    report = next((c for c in REPORT_CANDIDATES if (root / c).is_file()), None)
    if report is None and (root / "reports").is_dir():
        files = sorted(p for p in (root / "reports").iterdir() if p.is_file())
        report = str(files[0].relative_to(root)) if files else "reports"
    backbones = sorted(str(p.relative_to(root)) for p in (root / "models").glob("*/backbone.safetensors"))
    return report, backbones


# ---------------------------------------------------------------------------------------------------------------
# The flow.


@task(name="dvc-stage", cache_policy=NO_CACHE)
def run_stage(workspace: str, stage: str, force: bool = False, final_attempt: int = 1, tail_lines: int = 30,
              echo: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``: DVC runs it, or skips it when nothing it depends on changed."""
    from prefect.runtime import flow_run, task_run

    root = Path(workspace)
    attempt = int(task_run.run_count or 1)
    log = log_path_for(root, stage)
    started = time.monotonic()
    result = run_dvc(["repro", "--single-item", stage, *(["--force"] if force else [])], root,
                     env=stage_env(root, flow_run.id), log_path=log, echo=echo, tail_lines=tail_lines,
                     append=attempt > 1)
    seconds = round(time.monotonic() - started, 2)
    if result.returncode != 0:
        if attempt >= final_attempt:
            tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
        else:
            tries = f"(attempt {attempt} of {final_attempt}, will retry)"
        raise StageFailed(f"stage {stage!r} failed {tries}, dvc exit code {result.returncode}; the stages before it "
                          f"are recorded in dvc.lock, `dvc status` lists what is stale. "
                          f"Last lines of {log.relative_to(root)}:\n{result.tail}")
    outcome = stage_outcome(stage, result.head)
    get_run_logger().info("stage %s: %s in %.1fs (attempt %d)", stage, outcome, seconds, attempt)
    return {"stage": stage, "outcome": outcome, "seconds": seconds, "attempts": attempt,
            "log": str(log.relative_to(root))}


@task(name="dvc-sync", cache_policy=NO_CACHE)
def dvc_sync(workspace: str, command: str, echo: bool = False) -> None:
    """``dvc pull`` (missing outputs tolerated) or ``dvc push`` against the configured remote."""
    root = Path(workspace)
    args = ["pull", "--allow-missing"] if command == "pull" else ["push"]
    result = run_dvc(args, root, log_path=log_path_for(root, f"dvc-{command}"), echo=echo)
    if result.returncode != 0:
        raise SslcookError(f"dvc {command} failed (exit {result.returncode}):\n{result.tail}")


def _publish(root: Path, results: list[dict[str, Any]], flow_run_id: str | None) -> dict[str, Any]:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    rows = collect_metrics(root)
    report, backbones = find_outputs(root)
    markdown = metrics_markdown(root, rows, flow_run_id=flow_run_id, report=report, backbones=backbones)
    create_markdown_artifact(markdown=markdown, key="sslcook-results",
                             description="metrics per method and family, data version, git commit, outputs")
    if results:
        create_table_artifact(table=results, key="sslcook-stages", description="what DVC did with each stage")
    if report:
        create_link_artifact(link=(root / report).as_uri(), link_text=report, key="sslcook-report",
                             description="the pipeline report")
    return {"metrics": rows, "report": report, "backbones": backbones, "markdown": markdown}


def _want(flag: bool | None, configured: bool, have_remote: bool) -> bool:
    return have_remote and (configured if flag is None else flag)


@flow(name="sslcook-pipeline", description="Run the dvc.yaml pipeline stage by stage (DVC skips unchanged stages)")
def pipeline_flow(workspace: str | None = None, stages: list[str] | None = None, force: bool = False,
                  pull: bool | None = None, push: bool | None = None, echo: bool = False,
                  wait_minutes: float = 0.0) -> dict[str, Any]:
    """Run the pipeline of ``workspace`` (default: $SSLCOOK_WORKSPACE or the current directory).

    ``stages``: stage names, foreach groups or items (their upstream stages come along, as with ``dvc repro``);
    ``force``: re-run the named stages (every stage when none is named) even when DVC sees no change;
    ``pull``/``push``: sync with the DVC remote (default: params.yaml ``flow.dvc_pull``/``flow.dvc_push``,
    only when a remote is configured); ``echo``: stream the stages' output to stderr; ``wait_minutes``: how long
    to wait for another run that holds the workspace before failing (scheduled deployments wait, the CLI not).
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = resolve_root(workspace)
    validate_params(root)   # before DVC, which deletes a stage's outputs before the stage could refuse a value
    config = FlowConfig.from_workspace(root)
    run_id = str(flow_run.id) if flow_run.id else None
    with workspace_lock(root, "sslcook pipeline flow", run_id, wait_seconds=wait_minutes * 60,
                        on_wait=lambda who: logger.warning("waiting for the workspace: %s holds it", who)):
        materialised = ensure_raw_data(root, echo=echo)
        if materialised:
            logger.info("%s", materialised)
        have_remote = bool((pull or push or (pull is None and config.dvc_pull) or (push is None and config.dvc_push))
                           and remotes(root))
        if _want(pull, config.dvc_pull, have_remote):
            dvc_sync.with_options(retries=config.retries, retry_delay_seconds=config.retry_delay_seconds)(
                str(root), "pull", echo)
        order, selected = plan_stages(root, stages)
        forced = set(selected if stages else order) if force else set()
        logger.info("stages in DVC order: %s", ", ".join(order))
        results: list[dict[str, Any]] = []
        failed: str | None = None
        try:
            for name in order:
                stage_task = run_stage.with_options(name=name, task_run_name=name, retries=config.retries,
                                                    retry_delay_seconds=config.retry_delay_seconds)
                failed = name
                results.append(stage_task(str(root), name, name in forced, config.retries + 1,
                                          config.log_tail_lines, echo))
                failed = None
        finally:
            if failed is not None:   # publish how far the run came before the failure propagates
                done = {r["stage"] for r in results}
                table = results + [{"stage": name, "outcome": "failed" if name == failed else "not run",
                                    "seconds": None, "attempts": None, "log": None}
                                   for name in order if name not in done]
                try:
                    _publish(root, table, run_id)
                except Exception as exc:  # the stage's failure is the error to report, not this one
                    logger.warning("could not publish the artifacts of the failed run: %s", exc)
        if _want(push, config.dvc_push, have_remote):
            dvc_sync.with_options(retries=config.retries, retry_delay_seconds=config.retry_delay_seconds)(
                str(root), "push", echo)
        published = _publish(root, results, run_id)
    git = git_info(root)
    return {"flow_run_id": run_id, "workspace": str(root), "stages": results, "materialised": materialised,
            "data_version": data_version(root), "git_commit": git.get("commit"), "git_dirty": git.get("dirty"),
            **published}


# ---------------------------------------------------------------------------------------------------------------
# Without Prefect: plain `dvc repro`, same lock, same data preparation.

def run_plain(workspace: str | None = None, stages: list[str] | None = None, force: bool = False,
              echo: bool = True) -> int:
    root = resolve_root(workspace)
    validate_params(root)
    config = FlowConfig.from_workspace(root)
    with workspace_lock(root, "sslcook run --no-prefect"):
        materialised = ensure_raw_data(root, echo=echo)
        if materialised:
            print(materialised, file=sys.stderr)
        have_remote = (config.dvc_pull or config.dvc_push) and bool(remotes(root))
        if have_remote and config.dvc_pull:
            run_dvc(["pull", "--allow-missing"], root, echo=echo)
        result = run_dvc(["repro", *(stages or []), *(["--force"] if force else [])], root,
                         log_path=log_path_for(root, "dvc-repro"), echo=echo, tail_lines=config.log_tail_lines)
        if result.returncode != 0:
            raise StageFailed(f"dvc repro failed (exit {result.returncode}); `dvc status` lists what is stale. "
                              f"Last lines of {log_path_for(root, 'dvc-repro').relative_to(root)}:\n{result.tail}")
        if have_remote and config.dvc_push:
            pushed = run_dvc(["push"], root, echo=echo)
            if pushed.returncode != 0:
                raise SslcookError(f"dvc push failed (exit {pushed.returncode}):\n{pushed.tail}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslcook run", description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", "-w", help="pipeline workspace (default: $SSLCOOK_WORKSPACE or the current dir)")
    p.add_argument("--stage", "-s", action="append", dest="stages", metavar="NAME",
                   help="run this stage (name, foreach group or stage@item) and its upstream; repeatable")
    p.add_argument("--force", "-f", action="store_true", help="re-run the named stages (all when none is named)")
    p.add_argument("--no-prefect", action="store_true", help="plain `dvc repro`: no Prefect, no artifacts")
    p.add_argument("--no-pull", action="store_true", help="skip `dvc pull` even when a remote is configured")
    p.add_argument("--no-push", action="store_true", help="skip `dvc push` even when a remote is configured")
    p.add_argument("--quiet", "-q", action="store_true", help="do not stream the stages' output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.no_prefect:
        return run_plain(args.workspace, args.stages, args.force, echo=not args.quiet)
    validate_params(resolve_root(args.workspace))   # a bad value is one line, before Prefect starts a server
    summary = pipeline_flow(workspace=args.workspace, stages=args.stages, force=args.force,
                            pull=False if args.no_pull else None, push=False if args.no_push else None,
                            echo=not args.quiet)
    width = max((len(r["stage"]) for r in summary["stages"]), default=5)
    print("\n".join(f"{r['stage']:<{width}}  {r['outcome']:<8} {r['seconds']:>8.1f}s" for r in summary["stages"]))
    print()
    print(summary["markdown"])
    return 0


if __name__ == "__main__":
    from stages.common import run_main

    run_main(lambda: sys.exit(main()))
