"""The sweep flow: a list of params overrides run as DVC experiments, then ranked; ``sslcook sweep``.

Each combination of the grid (params.yaml ``flow.sweep.grid``, or ``--grid``) is queued with
``dvc exp run --queue -S key=value ...`` and the queue runs ``flow.sweep.max_parallel`` at a time
(``dvc queue start -j N``). Experiments run in DVC's temporary copies, so the workspace stays as it was, and every
experiment is a git ref that ``dvc exp show`` / ``dvc exp apply`` know. The flow then reads ``dvc exp show --json``
and publishes a table ranking every (experiment, method) by ``flow.sweep.metric``.

    sslcook sweep                                             # the grid in params.yaml
    sslcook sweep --grid 'pretrain.base_lr=[0.05, 0.1]' --grid 'methods=[[simclr], [vicreg]]' --jobs 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flows.dvcops import log_path_for, prefect_defaults, resolve_root, run_dvc, stage_env, workspace_lock

prefect_defaults()
from prefect import flow, get_run_logger, task  # noqa: E402  (after prefect_defaults)
from prefect.cache_policies import NO_CACHE  # noqa: E402

from stages.workspace.common import ConfigError, SslcookError  # noqa: E402
from stages.workspace.config.flow import FlowConfig  # noqa: E402

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
ACTIVE = {"Queued", "Running"}


class SweepFailed(SslcookError):
    """Experiments of a sweep failed or did not finish."""


def override_value(value: Any) -> str:
    """A value in DVC's ``-S key=value`` syntax (Hydra's override grammar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if _PLAIN.match(text) and text not in ("true", "false", "null") else json.dumps(text)


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _check_keys(root: Path, experiments: list[dict[str, Any]]) -> None:
    """Every override must name a key params.yaml has: DVC would add an unknown one silently."""
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    for overrides in experiments:
        for key in overrides:
            node: Any = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"params.yaml: sweep override {key!r}: no such key in params.yaml")
                node = node[part]


def parse_grid_args(items: list[str]) -> dict[str, list[Any]]:
    """``KEY=[v1, v2]`` (a YAML list of the values to try) -> {KEY: [v1, v2]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        try:
            parsed = yaml.safe_load(values) if sep else None
        except yaml.YAMLError:
            parsed = None
        if not key or not isinstance(parsed, list) or not parsed:
            raise ConfigError(f"--grid {item!r}: expected KEY=[value, ...] (a YAML list of the values to try)")
        grid[key.strip()] = parsed
    return grid


def _metric_value(data: Any, metric: str) -> float | None:
    """``metric`` (a dotted path) in a metrics file; ``primary`` takes the file's own ``primary_metric``."""
    if metric == "primary" and isinstance(data, dict) and isinstance(data.get("primary_metric"), str):
        metric = data["primary_metric"]
    node = data
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def collect_experiments(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json`` for the named experiments: state, metrics per file, params."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=root,
        env=stage_env(root),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SweepFailed(f"dvc exp show failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    shown = json.loads(proc.stdout)
    found: dict[str, dict[str, Any]] = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if exp.get("name") not in names:
                continue
            rev = (exp.get("revs") or [{}])[0]
            data = rev.get("data") or {}
            state = (exp.get("executor") or {}).get("state") or ("failed" if rev.get("error") else "success")
            found[exp["name"]] = {
                "state": state,
                "rev": rev.get("rev"),
                "metrics": {f: (m or {}).get("data") for f, m in (data.get("metrics") or {}).items()},
                "params": data.get("params") or {},
            }
    return found


def rank(
    experiments: list[dict[str, Any]], results: dict[str, dict[str, Any]], metric: str, order: str = "max"
) -> list[dict[str, Any]]:
    """One row per (experiment, metrics file) that has ``metric``, best first."""
    rows = []
    for exp in experiments:
        info = results.get(exp["name"], {})
        for file, data in sorted((info.get("metrics") or {}).items()):
            value = _metric_value(data, metric)
            if value is None:
                continue
            rows.append(
                {
                    "experiment": exp["name"],
                    "overrides": exp["args"],
                    "method": Path(file).stem,
                    "metrics_file": file,
                    metric: value,
                }
            )
    rows.sort(key=lambda r: r[metric], reverse=(order == "max"))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return [{"rank": r.pop("rank"), **r} for r in rows]


@task(name="queue-experiment", cache_policy=NO_CACHE)
def queue_experiment(workspace: str, name: str, args: list[str]) -> None:
    root = Path(workspace)
    cmd = ["exp", "run", "--queue", "--name", name]
    for arg in args:
        cmd += ["-S", arg]
    result = run_dvc(cmd, root, log_path=log_path_for(root, f"queue-{name}"))
    if result.returncode != 0:
        raise SweepFailed(f"could not queue experiment {name} ({' '.join(args)}):\n{result.tail}")


@task(name="run-queue", cache_policy=NO_CACHE)
def run_queue(workspace: str, names: list[str], jobs: int, timeout_s: float, poll_s: float = 2.0) -> dict[str, str]:
    """Start ``jobs`` queue workers and wait until every named experiment has finished."""
    import logging

    from dvc.repo import Repo

    # reading the queue in-process goes through kombu, which warns about its default broker host on every poll
    logging.getLogger("kombu").setLevel(logging.ERROR)
    root = Path(workspace)
    logger = get_run_logger()
    result = run_dvc(
        ["queue", "start", "-j", str(jobs)], root, env=stage_env(root), log_path=log_path_for(root, "dvc-queue-start")
    )
    if result.returncode != 0:
        raise SweepFailed(f"dvc queue start failed:\n{result.tail}")
    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None
    states: dict[str, str] = {}
    while True:
        with Repo(str(root)) as repo:
            queue = repo.experiments.celery_queue
            states = {s["name"]: s["status"] for s in queue.status() if s.get("name") in names}
            workers = queue.worker_status()
        pending = [n for n in names if states.get(n, "Queued") in ACTIVE]
        if not pending:
            break
        now = time.monotonic()
        if now > deadline:
            raise SweepFailed(
                f"sweep timed out with {len(pending)} experiment(s) unfinished: {', '.join(pending)} "
                "(`dvc queue status`, `dvc queue kill` to stop them)"
            )
        # a queue without workers never drains (e.g. they crashed at start): say so instead of waiting for hours
        idle_since = (idle_since or now) if not workers else None
        if idle_since is not None and now - idle_since > 60:
            raise SweepFailed(
                f"no DVC queue worker is running while {', '.join(pending)} wait; see `dvc queue logs <name>`"
            )
        time.sleep(poll_s)
    logger.info("experiments finished: %s", ", ".join(f"{n}={states.get(n)}" for n in names))
    return states


def _failure_tail(root: Path, name: str) -> str:
    result = run_dvc(["queue", "logs", name], root, tail_lines=15)
    return result.tail


def plan_experiments(root: Path, sets: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """One named experiment per override set, its overrides in ``-S`` syntax; every key checked first."""
    if not sets:
        raise ConfigError("params.yaml: flow.sweep: nothing to run (empty grid)")
    _check_keys(root, sets)
    return [
        {"name": f"{prefix}-{i}", "overrides": s, "args": [f"{k}={override_value(v)}" for k, v in s.items()]}
        for i, s in enumerate(sets, 1)
    ]


def sweep_markdown(
    prefix: str, metric: str, order: str, jobs: int, planned: list[dict[str, Any]], ranking: list[dict[str, Any]]
) -> str:
    failed = [e for e in planned if e["state"] != "success"]
    columns = ["rank", "experiment", "overrides", "method", metric]
    md = [
        f"# sslcook sweep `{prefix}`",
        "",
        f"ranked by `{metric}` ({order}); {len(planned)} experiments, {jobs} at a time, {len(failed)} failed",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in ranking:
        md.append(
            "| "
            + " | ".join(
                " ".join(row[c])
                if c == "overrides"
                else (f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]))
                for c in columns
            )
            + " |"
        )
    if failed:
        md += ["", "failed: " + ", ".join(f"{e['name']} ({' '.join(e['args'])})" for e in failed)]
    return "\n".join(md) + "\n"


@flow(name="sslcook-sweep", description="Run a grid of params overrides as DVC experiments and rank them")
def sweep_flow(
    workspace: str | None = None,
    grid: dict[str, list[Any]] | None = None,
    experiments: list[dict[str, Any]] | None = None,
    max_parallel: int | None = None,
    metric: str | None = None,
    order: str | None = None,
    name_prefix: str | None = None,
    timeout_minutes: float | None = None,
    wait_minutes: float = 0.0,
) -> dict[str, Any]:
    """Queue one DVC experiment per override set, run them ``max_parallel`` at a time, rank by ``metric``.

    ``experiments`` (a list of {dotted key: value}) takes precedence over ``grid`` ({key: [values]}, every
    combination); both default to params.yaml ``flow.sweep.grid``.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = resolve_root(workspace)
    config = FlowConfig.from_workspace(root).sweep
    metric, order, jobs = metric or config.metric, order or config.order, max_parallel or config.max_parallel
    if order not in ("max", "min"):
        raise ConfigError(f"sweep order {order!r}: expected max or min")
    sets = experiments if experiments is not None else expand_grid(grid if grid is not None else config.grid)
    prefix = name_prefix or "sweep-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    planned = plan_experiments(root, sets, prefix)
    names = [e["name"] for e in planned]
    with workspace_lock(
        root,
        "sslcook sweep flow",
        str(flow_run.id) if flow_run.id else None,
        wait_seconds=wait_minutes * 60,
        on_wait=lambda who: logger.warning("waiting for the workspace: %s holds it", who),
    ):
        for exp in planned:
            queue_experiment.with_options(task_run_name=f"queue {exp['name']}")(str(root), exp["name"], exp["args"])
        states = run_queue(str(root), names, jobs, (timeout_minutes or config.timeout_minutes) * 60)
        results = collect_experiments(root, names)
    for exp in planned:
        exp["state"] = results.get(exp["name"], {}).get("state") or states.get(exp["name"], "unknown").lower()
    failed = [e for e in planned if e["state"] != "success"]
    ranking = rank(planned, results, metric, order)
    markdown = _publish(prefix, metric, order, jobs, planned, ranking)
    summary = {
        "prefix": prefix,
        "metric": metric,
        "order": order,
        "experiments": planned,
        "ranking": ranking,
        "markdown": markdown,
        "failed": [e["name"] for e in failed],
    }
    if failed:
        summary["failure_details"] = _failures(root, prefix, planned, failed, logger)
    return summary


def _publish(prefix: str, metric: str, order: str, jobs: int, planned: list, ranking: list) -> str:
    """The sweep's Markdown summary and ranking table as Prefect artifacts; returns the Markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = sweep_markdown(prefix, metric, order, jobs, planned, ranking)
    if ranking:
        create_table_artifact(
            table=[{**row, "overrides": " ".join(row["overrides"])} for row in ranking],
            key="sslcook-sweep-ranking",
            description=f"ranked by {metric} ({order})",
        )
    create_markdown_artifact(markdown=markdown, key="sslcook-sweep", description=f"sweep {prefix}")
    return markdown


def _failures(root: Path, prefix: str, planned: list, failed: list, logger) -> str:
    """The failed experiments' log tails; the sweep fails when every experiment did."""
    details = "\n".join(
        f"--- {e['name']} ({' '.join(e['args'])}):\n{_failure_tail(root, e['name'])}" for e in failed[:3]
    )
    logger.error("%d of %d experiments failed", len(failed), len(planned))
    if len(failed) == len(planned):
        raise SweepFailed(f"every experiment of sweep {prefix} failed:\n{details}")
    return details


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslcook sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", "-w", help="pipeline workspace (default: $SSLCOOK_WORKSPACE or the current dir)")
    p.add_argument(
        "--grid",
        "-g",
        action="append",
        default=[],
        metavar="KEY=[V1, V2]",
        help="values to try for a params.yaml key (YAML list); replaces flow.sweep.grid; repeatable",
    )
    p.add_argument("--jobs", "-j", type=int, help="experiments at once (default: flow.sweep.max_parallel)")
    p.add_argument("--metric", help="metric that ranks the experiments (default: flow.sweep.metric)")
    p.add_argument("--order", choices=["max", "min"], help="best is the max or the min (default: flow.sweep.order)")
    p.add_argument("--name", help="experiment name prefix (default: sweep-<UTC time>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: must be >= 1")
    grid = parse_grid_args(args.grid) if args.grid else None
    summary = sweep_flow(
        workspace=args.workspace,
        grid=grid,
        max_parallel=args.jobs,
        metric=args.metric,
        order=args.order,
        name_prefix=args.name,
    )
    print(summary["markdown"])
    if summary["failed"]:
        print(summary.get("failure_details", ""))
        return 1
    return 0
