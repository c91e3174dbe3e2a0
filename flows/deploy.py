"""Deployments of the sslcook flows on nightly cron schedules; ``sslcook serve`` serves them locally.

Two ways to schedule the same three flows (pipeline, new data version, sweep), each with its default parameters:

- ``sslcook serve``: one long-running process creates the deployments on the Prefect API and runs their flow
  runs itself (``prefect.serve``), no work pool needed. Crons come from params.yaml ``flow.schedule``.
- ``prefect.yaml`` (repository root): ``prefect deploy --name nightly`` registers them on the
  ``sslcook-process`` process work pool, and ``prefect worker start --pool sslcook-process`` runs them
  (flows/README_flows.md). prefect.yaml also holds GPU deployments (a process pool on a GPU host, a Docker pool).

tests/test_deploy.py checks that prefect.yaml and params.yaml give the same schedules and parameters.
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.dvcops import resolve_root
from stages.workspace.config.flow import FlowConfig

DEPLOYMENT_NAME = "nightly"
WORK_POOL = "sslcook-process"


def deployment_specs(config: FlowConfig, workspace: str | None = None) -> list[dict[str, Any]]:
    """What each nightly deployment runs: flow entrypoint, cron and default parameters."""
    base: dict[str, Any] = {"wait_minutes": config.wait_minutes}
    if workspace:
        base["workspace"] = workspace
    return [
        {
            "flow": "sslcook-new-data",
            "entrypoint": "flows/data_flow.py:new_data_flow",
            "cron": config.schedule.new_data,
            "parameters": dict(base),
            "description": "ingest params data.source as a new data version, then run the pipeline",
        },
        {
            "flow": "sslcook-pipeline",
            "entrypoint": "flows/pipeline.py:pipeline_flow",
            "cron": config.schedule.pipeline,
            "parameters": dict(base),
            "description": "run the dvc.yaml pipeline (unchanged stages skipped) and publish its results",
        },
        {
            "flow": "sslcook-sweep",
            "entrypoint": "flows/sweep.py:sweep_flow",
            "cron": config.schedule.sweep,
            "parameters": dict(base),
            "description": "run params flow.sweep.grid as DVC experiments and rank them",
        },
    ]


def build_deployments(config: FlowConfig, workspace: str | None = None) -> list:
    """RunnerDeployments for ``prefect.serve`` (one run at a time each: they share one workspace)."""
    from prefect.schedules import Cron

    from flows.data_flow import new_data_flow
    from flows.pipeline import pipeline_flow
    from flows.sweep import sweep_flow

    flows = {"sslcook-new-data": new_data_flow, "sslcook-pipeline": pipeline_flow, "sslcook-sweep": sweep_flow}
    return [
        flows[spec["flow"]].to_deployment(
            name=DEPLOYMENT_NAME,
            schedules=[Cron(spec["cron"], timezone=config.timezone)],
            parameters=spec["parameters"],
            description=spec["description"],
            concurrency_limit=1,
            tags=["sslcook"],
        )
        for spec in deployment_specs(config, workspace)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sslcook serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", "-w", help="pipeline workspace (default: $SSLCOOK_WORKSPACE or the current dir)")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once across the deployments (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the deployments and their schedules, serve nothing")
    args = p.parse_args(argv)
    root = resolve_root(args.workspace)
    config = FlowConfig.from_workspace(root)
    specs = deployment_specs(config, str(root))
    for spec in specs:
        print(
            f"{spec['flow']}/{DEPLOYMENT_NAME}: cron '{spec['cron']}' ({config.timezone}), "
            f"{spec['entrypoint']}, parameters {spec['parameters']}"
        )
    if args.dry_run:
        return 0
    from prefect import serve

    serve(*build_deployments(config, str(root)), limit=args.limit)
    return 0
