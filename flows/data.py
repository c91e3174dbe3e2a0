"""``sslcook data``: bring a data source into data/raw and version it with DVC.

    sslcook data ingest [SOURCE] [--path P] [--no-dvc]
    sslcook data update [SOURCE] [--path P] [--commit] [--no-pipeline]   # the new-data-version flow

SOURCE is mnist5k (default data.source), folder, archive or cifar10; folder/archive take the path of the tree,
cifar10 a local archive of its image tree (without one, torchvision downloads it). After ingest, the new data
version is one ``git commit`` away.
"""

from __future__ import annotations

import argparse

from stages.workspace.common import ConfigError
from stages.workspace.ingest import SOURCES, ingest


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, like every other user error
        raise ConfigError(f"sslcook data: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sslcook data", description="Bring a data source into data/raw and `dvc add` it.")
    commands = parser.add_subparsers(dest="command", metavar="ingest")
    cmd = commands.add_parser(
        "ingest",
        help="replace data/raw with SOURCE and `dvc add data/raw`",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument(
        "source", nargs="?", metavar="SOURCE", help=f"one of {', '.join(SOURCES)} (default: params data.source)"
    )
    cmd.add_argument(
        "--path",
        help="folder or archive for folder/archive; a local CIFAR-10 archive for cifar10 (default: params data.path)",
    )
    cmd.add_argument("--no-dvc", action="store_true", help="only write data/raw; do not run `dvc add`")
    return parser


def _ingest_locked(source: str | None, path: str | None, *, run_dvc: bool):
    """Ingest holding the workspace lock: data/raw and data.dvc are never replaced under a running pipeline."""
    from flows.dvcops import workspace_lock
    from stages.workspace.common import workspace

    root = workspace()
    if not (root / ".dvc").is_dir():  # no DVC repository: no pipeline can run here to be disturbed
        return ingest(source, path, run_dvc=run_dvc, root=root)
    with workspace_lock(root, "sslcook data ingest"):
        return ingest(source, path, run_dvc=run_dvc, root=root)


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "update":  # ingest + pipeline as one Prefect flow (flows/data_flow.py)
        from flows.data_flow import main as update_main

        return update_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command != "ingest":
        build_parser().print_help()
        return 2
    if args.source and args.source not in SOURCES:
        raise ConfigError(f"unknown data source {args.source!r} (known: {', '.join(SOURCES)})")
    result = _ingest_locked(args.source, args.path, run_dvc=not args.no_dvc)
    splits = ", ".join(f"{split} {sum(c.values())}" for split, c in result.counts.items())
    classes = {c for per_class in result.counts.values() for c in per_class}
    print(
        f"data/raw: {result.source}, {result.total} images ({splits}), {len(classes)} classes, "
        f"{len(result.skipped)} skipped (listed in data/raw/SOURCE.json)"
    )
    for bad in result.skipped[:10]:
        print(f"  skipped {bad['path']}: {bad['reason']}")
    if len(result.skipped) > 10:
        print(f"  ... and {len(result.skipped) - 10} more")
    if result.dvc:
        print(f"data version: {result.data_version} (data.dvc)")
        print(f'next: git add data.dvc data/.gitignore && git commit -m "data: {result.source}"')
    else:
        print(f"data version: {result.data_version} (not recorded: run `dvc add data/raw` to track it)")
    return 0
