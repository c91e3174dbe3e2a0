"""The new-data-version flow: ingest a source, run the pipeline on it, report the data version before and after.

    sslcook data update folder --path /data/new-images            # ingest + pipeline, nothing committed
    sslcook data update mnist5k --commit                          # + `git commit` of data.dvc

Ingest is ``stages.workspace.ingest.ingest`` (data/raw replaced atomically, then ``dvc add``). The flow
commits nothing unless asked: with ``commit``, only data.dvc (and data/.gitignore) are committed, before the
pipeline runs, so every artifact's lineage names a commit that holds the data version it was made from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.dvcops import prefect_defaults, resolve_root, workspace_lock

prefect_defaults()
from prefect import flow, get_run_logger, task  # noqa: E402  (after prefect_defaults)
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.pipeline import pipeline_flow  # noqa: E402
from stages.workspace.common import SslcookError  # noqa: E402
from stages.workspace.lineage import data_version  # noqa: E402


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_source(workspace: str, source: str | None, path: str | None) -> dict[str, Any]:
    from stages.workspace.ingest import ingest

    result = ingest(source, path, root=Path(workspace))
    return {
        "source": result.source,
        "images": result.total,
        "counts": result.counts,
        "skipped": len(result.skipped),
        "data_version": result.data_version,
    }


@task(name="git-commit-data", cache_policy=NO_CACHE)
def commit_data_version(workspace: str, message: str) -> str:
    root = Path(workspace)
    paths = [p for p in ("data.dvc", "data/.gitignore") if (root / p).exists()]

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SslcookError(f"git {args[0]} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        return proc.stdout.strip()

    git("add", "--", *paths)
    git("commit", "-q", "-m", message, "--", *paths)  # only these paths, whatever else is staged
    return git("rev-parse", "HEAD")


def _data_markdown(
    ingested: dict, path: str | None, before: str | None, after: str, commit_sha: str | None, pipeline: dict | None
) -> str:
    """The flow's summary: the source, the data version before and after, the commit, the pipeline's table."""
    changed = after != before
    if commit_sha:
        committed = f"- committed: `{commit_sha}`"
    elif changed:
        committed = "- not committed: `git add data.dvc data/.gitignore && git commit`"
    else:
        committed = "- nothing to commit"
    lines = [
        "# new data version",
        "",
        f"- source: `{ingested['source']}`" + (f" from `{path}`" if path else ""),
        f"- images: {ingested['images']} ({ingested['skipped']} skipped)",
        f"- data version before: `{before or 'none'}`",
        f"- data version after: `{after}`" + (" (new)" if changed else " (unchanged)"),
        committed,
    ]
    if pipeline:
        lines += ["", pipeline["markdown"]]
    return "\n".join(lines) + "\n"


@flow(name="sslcook-new-data", description="Ingest a data source as a new data version and run the pipeline on it")
def new_data_flow(
    source: str | None = None,
    path: str | None = None,
    workspace: str | None = None,
    commit: bool = False,
    run_pipeline: bool = True,
    wait_minutes: float = 0.0,
) -> dict[str, Any]:
    """Ingest ``source`` (default params ``data.source``; ``path`` for folder/archive/cifar10) into data/raw,
    optionally commit data.dvc, run the pipeline, and publish the data version before and after."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = resolve_root(workspace)
    run_id = str(flow_run.id) if flow_run.id else None
    if path is not None:
        path = str(Path(path).expanduser().resolve())
    with workspace_lock(
        root,
        "sslcook new-data flow",
        run_id,
        wait_seconds=wait_minutes * 60,
        on_wait=lambda who: logger.warning("waiting for the workspace: %s holds it", who),
    ):
        before = data_version(root)
        ingested = ingest_source(str(root), source, path)
        after = data_version(root)
        changed = after != before
        logger.info("data version %s -> %s (%s)", before, after, "new" if changed else "unchanged")
        commit_sha = None
        if commit and changed:
            commit_sha = commit_data_version(
                str(root), f"data: {ingested['source']} ({ingested['images']} images), data version {after}"
            )
        pipeline = pipeline_flow(workspace=str(root)) if run_pipeline else None
    markdown = _data_markdown(ingested, path, before, after, commit_sha, pipeline)
    create_markdown_artifact(
        markdown=markdown, key="sslcook-data-version", description="data version before and after ingest"
    )
    return {
        "source": ingested["source"],
        "data_version_before": before,
        "data_version_after": after,
        "changed": changed,
        "commit": commit_sha,
        "ingested": ingested,
        "pipeline": pipeline,
        "markdown": markdown,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sslcook data update", description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="mnist5k | folder | archive | cifar10 (default: params data.source)")
    p.add_argument("--path", help="the folder or archive of folder/archive/cifar10 sources")
    p.add_argument("--workspace", "-w", help="pipeline workspace (default: $SSLCOOK_WORKSPACE or the current dir)")
    p.add_argument("--commit", action="store_true", help="git commit data.dvc when the data version changed")
    p.add_argument("--no-pipeline", action="store_true", help="only ingest; do not run the pipeline")
    args = p.parse_args(argv)
    if not args.no_pipeline:  # a bad value stops the update before it replaces the data, not after
        from flows.pipeline import validate_params

        validate_params(resolve_root(args.workspace))
    summary = new_data_flow(
        source=args.source,
        path=args.path,
        workspace=args.workspace,
        commit=args.commit,
        run_pipeline=not args.no_pipeline,
    )
    print(summary["markdown"])
    return 0


if __name__ == "__main__":
    from stages.workspace.common import run_main

    run_main(lambda: sys.exit(main()))
