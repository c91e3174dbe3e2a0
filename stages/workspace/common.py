"""What every stage shares: user-facing errors, the entry-point wrapper, atomic writes, JSON helpers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class SslcookError(Exception):
    """An error the user can act on: printed as one line, no traceback, non-zero exit."""

    exit_code = 1


class ConfigError(SslcookError):
    """Invalid params.yaml (or CLI arguments): exit code 2."""

    exit_code = 2


class DataError(SslcookError):
    """Unusable input data (bad image, corrupted shard or file, unsafe archive member)."""

    exit_code = 1


def is_workspace(folder: Path) -> bool:
    """A pipeline workspace: dvc.yaml and a DVC repository (.dvc/)."""
    return (folder / "dvc.yaml").is_file() and (folder / ".dvc").is_dir()


def workspace(near: Path | None = None) -> Path:
    """The pipeline workspace: the nearest folder above ``near`` that is one (an artifact's own workspace), else
    $SSLCOOK_WORKSPACE, else the current directory (stages run from it)."""
    if near is not None:
        for folder in [near.parent, *near.parent.parents]:
            if is_workspace(folder):
                return folder
    return Path(os.environ.get("SSLCOOK_WORKSPACE", os.getcwd())).resolve()


def describe_exception(exc: BaseException) -> str:
    """An exception's message as one line, whole: torch's multi-line load errors keep their warning that
    ``weights_only=False`` can run code and the unpickler's reason, minus the request to file an issue."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    for boilerplate in (
        "Please file an issue with the following so that we can make `weights_only=True` "
        "compatible with your use case: ",
        "Check the documentation of torch.load to learn more about types accepted by default with "
        "weights_only https://pytorch.org/docs/stable/generated/torch.load.html.",
    ):
        text = text.replace(boilerplate, "")
    return text.strip() or type(exc).__name__


# errors of the machine rather than of the code: reported in one line (path and errno text), not as a traceback
OUTPUT_FAULTS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EIO)


def os_error_line(exc: OSError) -> str:
    """A failed write or read as one line: the path and the errno text (e.g. "No space left on device")."""
    reason = exc.strerror or (errno.errorcode.get(exc.errno, "") if exc.errno else "") or describe_exception(exc)
    where = exc.filename if exc.filename is not None else "output"
    return f"{where}: {reason}"


# A stage started by the CLI watches it (flows.dvcops.stage_env sets this): SIGKILL of `sslcook` leaves dvc and
# its stage orphaned, so the stage stops itself (SIGTERM: pretraining keeps its last checkpoint).
WATCH_ENV = "SSLCOOK_WATCH_PID"


def process_identity(pid: int) -> str:
    """``pid:start-time``: a pid that exited and was reused by another process gives another identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def _alive(identity: str) -> bool:
    pid = int(identity.split(":", 1)[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return identity.endswith(":?") or process_identity(pid) == identity


def watch_launcher(interval: float = 0.5) -> threading.Thread | None:
    """Stop this process (SIGTERM to itself) once the process named by $SSLCOOK_WATCH_PID is gone."""
    identity = os.environ.get(WATCH_ENV, "")
    if not identity.split(":", 1)[0].isdigit():
        return None
    import signal

    def watch() -> None:
        while _alive(identity):
            time.sleep(interval)
        try:  # the output went to the command that is gone: its pipe may be closed
            print(
                f"the sslcook command that started this stage (pid {identity.split(':')[0]}) is gone; stopping",
                file=sys.stderr,
            )
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="sslcook-watch-launcher", daemon=True)
    thread.start()
    return thread


class Terminated(KeyboardInterrupt):
    """SIGTERM (dvc, Prefect or a scheduler cancelling), raised in the main thread: it unwinds like Ctrl-C, so
    pretraining keeps its last checkpoint, a running stage's process group is stopped (flows.dvcops.run_dvc) and
    Prefect's temporary API server shuts down with the process."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread. The caller's handler comes back
    after it, so an in-process caller (a notebook, a test, a scheduler) does not keep ours, nor hand it to the
    processes it forks later. From another thread the caller's handlers stay as they are."""
    import signal

    def handler(signum, frame):  # noqa: ARG001
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def run_main(main: Callable[[], Any]) -> None:
    """Run a stage's main; user errors, a full disk or a read-only output become one line on stderr and a
    non-zero exit code, never a traceback."""
    watch_launcher()
    try:
        main()
    except SslcookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in OUTPUT_FAULTS:
            raise
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(1)


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
        try:
            yield target
            if final.is_dir() and not final.is_symlink():
                _swap_folder(target, final)  # the old folder is now at ``target``, deleted with ``tmp``
            else:
                os.replace(target, final)
        except OSError as exc:  # a full disk or a read-only folder: name the output, not the temporary path
            if exc.filename is None or str(tmp) in str(exc.filename):
                exc.filename = str(final)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_folder(new: Path, final: Path) -> None:
    """Put folder ``new`` at ``final`` and the old ``final`` at ``new``, with no moment without ``final``.

    Linux swaps them in one step (renameat2 RENAME_EXCHANGE); elsewhere the old folder is renamed aside, the new
    one moved in, and the old one deleted by the caller: a folder cannot be renamed onto a non-empty one.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is not None:
            at_fdcwd, rename_exchange = -100, 2
            if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(final), rename_exchange) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without the exchange
                raise OSError(err, os.strerror(err), str(final))
    aside = new.with_name(new.name + ".old")
    os.replace(final, aside)
    os.replace(new, final)
    os.replace(aside, new)


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it (an error names the folder and the errno
    text), so a read-only or full output is found before hours of work rather than after."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise SslcookError(f"{folder}: cannot write there ({exc.strerror or describe_exception(exc)})") from None
    return folder


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


def manifest_image_size(manifest: Any) -> int | None:
    """The side the shards' images are seen at by default, from the shard manifest's ``image_size`` facts: the
    shorter side of the stored images (their one size when uniform, else the most common); None without them."""
    stats = manifest.get("image_size") if isinstance(manifest, dict) else None
    if not isinstance(stats, dict):
        return None
    if stats.get("uniform"):
        return int(min(stats["uniform"]))
    common = (stats.get("stored") or {}).get("most_common") or []
    return int(min(common[0][:2])) if common else None
