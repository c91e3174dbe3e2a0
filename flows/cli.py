"""``sslcook``: the user's entry point. Each subcommand lives in its own module with ``main(argv)``.

Subcommand modules are imported only when used, so ``sslcook --help`` stays fast.
"""

from __future__ import annotations

import importlib
import signal
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("flows.pipeline", "run the whole pipeline (dvc.yaml stages as Prefect tasks), in-process"),
    "data": (
        "flows.data",
        "data ingest SOURCE: bring a source into data/raw + dvc add; data update: ingest + run the pipeline",
    ),
    "sweep": ("flows.sweep", "run a list of params overrides as DVC experiments and rank them"),
    "serve": ("flows.deploy", "serve the pipeline, data and sweep deployments (nightly cron) locally"),
    "trace": ("flows.trace", "print the lineage chain of an artifact back to its data version and commit"),
}

USAGE = (
    "usage: sslcook {"
    + ",".join(COMMANDS)
    + "} [options]\n\ncommands:\n"
    + "\n".join(f"  {name:<7} {doc}" for name, (_, doc) in COMMANDS.items())
    + "\n\n`sslcook COMMAND --help` for its options."
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from stages.workspace.common import OUTPUT_FAULTS, SslcookError, Terminated, os_error_line, stop_on_sigterm

    try:
        with stop_on_sigterm():
            return int(module.main(rest) or 0)
    except SslcookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk or a read-only workspace: one line, as in every stage
        if exc.errno not in OUTPUT_FAULTS:
            raise
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
