"""What every stage shares: user-facing errors, the entry-point wrapper, atomic writes, JSON helpers."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class SslcookError(Exception):
    """An error the user can act on: printed as one line, no traceback, non-zero exit."""

    exit_code = 1


class ConfigError(SslcookError):
    """Invalid params.yaml (or CLI arguments): exit code 2."""

    exit_code = 2


class DataError(SslcookError):
    """Unusable input data (bad image, corrupted shard or file, unsafe archive member)."""

    exit_code = 1


def workspace() -> Path:
    """The pipeline workspace: the folder holding params.yaml and dvc.yaml (stages run from it)."""
    return Path(os.environ.get("SSLCOOK_WORKSPACE", os.getcwd())).resolve()


def run_main(main: Callable[[], Any]) -> None:
    """Run a stage's main; user errors become one line on stderr and their exit code."""
    try:
        main()
    except SslcookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Works for files and for directories (the block creates whatever it likes at the yielded path).
    A crash or an exception leaves no partial output under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, keys sorted, so equal content gives equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
