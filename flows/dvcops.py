"""What the flows need from DVC: the stage plan, running a DVC command with its log, remotes, the workspace lock.

The flows never redefine the pipeline: the stage list and its order come from DVC's own planner (the order
``dvc repro`` uses), and each stage runs through ``dvc repro --single-item``, so DVC decides what is up to date.
Nothing here imports Prefect, so ``sslcook run --no-prefect`` stays light.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from stages.common import WATCH_ENV, ConfigError, SslcookError, process_identity, workspace

def prefect_defaults() -> None:
    """Settings the flows want before Prefect is imported (an explicit environment variable still wins).

    The temporary server that in-process runs start is given 20 s by default; on a busy 2-core machine it can
    need more, and a pipeline run should not fail for that.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


STOP_GRACE_SECONDS = 30.0   # an interrupted stage's time to stop cleanly before it is killed
LOCK_FILE = Path(".dvc") / "tmp" / "sslcook-workspace.lock"
LOG_DIR = Path(".dvc") / "tmp" / "sslcook-logs"   # DVC's tmp dir: git-ignored, per workspace


class WorkspaceBusy(SslcookError):
    """Another pipeline run (or sweep) holds the workspace."""


class StageFailed(SslcookError):
    """A DVC stage kept failing; the message names it and quotes the tail of its log."""


@dataclass
class DvcResult:
    returncode: int
    log_path: Path | None
    head: str      # the first 64 KiB of the output: DVC says there whether it ran or skipped the stage
    tail: str      # the last lines of the output


def resolve_root(path: str | os.PathLike | None = None) -> Path:
    """The workspace to run in: ``path``, else $SSLCOOK_WORKSPACE, else the current directory."""
    root = Path(path).expanduser().resolve() if path else workspace()
    if not (root / "dvc.yaml").exists():
        raise ConfigError(f"{root / 'dvc.yaml'}: file not found (not a pipeline workspace)")
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root}: not a DVC repository (no .dvc/); run `dvc init` there first")
    return root


def stage_env(root: Path, flow_run_id: str | None = None) -> dict[str, str]:
    """The environment of a DVC command: this interpreter first on PATH (dvc.yaml says `python -m stages.X`)
    and the flow run id that every stage run's provenance records (provenance/)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # stages find their workspace from the cwd DVC gives them: a DVC experiment runs them in a temporary copy,
    # which an inherited SSLCOOK_WORKSPACE would redirect to this workspace's params and outputs
    env.pop("SSLCOOK_WORKSPACE", None)
    # provenance prefers PREFECT__FLOW_RUN_ID; under a worker that is the outer run, so hand over ours only
    env.pop("PREFECT__FLOW_RUN_ID", None)
    if flow_run_id:
        env["SSLCOOK_FLOW_RUN_ID"] = str(flow_run_id)
    else:
        env.pop("SSLCOOK_FLOW_RUN_ID", None)
    return env


def _last_lines(text: str, n: int) -> str:
    # progress bars redraw with \r: keep what the terminal would show last on each line
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in lines[-n:])


def run_dvc(args: Sequence[str], root: Path, *, env: dict[str, str] | None = None, log_path: Path | None = None,
            echo: bool = False, tail_lines: int = 30, append: bool = False) -> DvcResult:
    """Run ``python -m dvc ARGS`` in ``root``; stream its output to ``log_path`` (and stderr when ``echo``)."""
    cmd = [sys.executable, "-m", "dvc", *args]
    env = env if env is not None else stage_env(root)
    if args and args[0] == "repro":
        # the stages watch this process: SIGKILL of `sslcook` (no chance to stop the group) still stops them
        env = {**env, WATCH_ENV: process_identity(os.getpid())}
    head = bytearray()
    tail: deque[bytes] = deque()
    tail_size = 0
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab" if append else "wb")
        log.write(f"$ dvc {' '.join(args)}\n".encode())
    try:
        # its own process group: an interrupted run stops dvc and the stage it runs together (stop_group)
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            if len(head) < 1 << 16:
                head += chunk[: (1 << 16) - len(head)]
            tail.append(chunk)
            tail_size += len(chunk)
            while tail_size > 1 << 16 and len(tail) > 1:
                tail_size -= len(tail.popleft())
            if log is not None:
                log.write(chunk)
                log.flush()
            if echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        returncode = proc.wait()
    except BaseException:
        with contextlib.suppress(NameError):
            stop_group(proc)
        raise
    finally:
        if log is not None:
            log.close()
    text = b"".join(tail).decode(errors="replace")
    return DvcResult(returncode, log_path, head.decode(errors="replace"), _last_lines(text, tail_lines))


def stop_group(proc: subprocess.Popen, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """Stop ``proc``'s process group (dvc and the stage command it runs): SIGTERM first, which the pretrain stage
    turns into a clean stop that keeps its last checkpoint, then SIGKILL for whatever is left after
    ``grace_seconds``. Nothing of the group outlives the call."""
    pgid = proc.pid

    def alive() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member we cannot signal: treat the group as still there
            return True
        proc.poll()  # reap dvc itself once it exits, or the group never empties
        return True

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.wait(timeout=10)


def stage_outcome(stage: str, head: str) -> str:
    """What DVC did with a stage, from its own words: ran | skipped | restored (from the run cache) | checked."""
    quoted = re.escape(f"'{stage}'")
    if re.search(rf"Stage {quoted} is cached - skipping run", head):
        return "restored"
    if re.search(rf"{quoted} didn't change, skipping", head):
        return "skipped"
    if re.search(rf"Running stage {quoted}", head):
        return "ran"
    return "checked"   # e.g. a data source stage (data.dvc) whose data DVC verified


def _absolute_target(root: Path, target: str) -> str:
    # DVC resolves targets against the current directory; the flow may run from anywhere
    if ":" in target:
        path, name = target.rsplit(":", 1)
        return f"{root / path}:{name}"
    if (root / target).exists():
        return str(root / target)
    return f"{root / 'dvc.yaml'}:{target}"


def _address(root: Path, stage) -> str:
    """A stage's name as `dvc repro` takes it from the workspace root (DVC's own is relative to the cwd)."""
    from dvc.stage import PipelineStage

    dvcfile = os.path.relpath(stage.path, root)
    if isinstance(stage, PipelineStage):
        return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"
    return dvcfile


def plan_stages(root: Path, targets: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """The stages ``dvc repro [targets]`` would visit, in its order, foreach expanded (``pretrain@simclr``),
    and the stages the targets themselves name.

    A target may be a stage, a foreach group (``pretrain`` = every ``pretrain@...``) or an expanded item;
    its upstream stages are included, as ``dvc repro`` would.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    try:
        with Repo(str(root)) as repo:
            graph = get_active_graph(repo.index.graph)
            selected = collect_stages(repo, [_absolute_target(root, t) for t in (targets or ["dvc.yaml"])])
            return ([_address(root, stage) for stage in plan_repro(graph, selected)],
                    [_address(root, stage) for stage in selected])
    except DvcException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"dvc.yaml: {first}") from None


def remotes(root: Path) -> list[str]:
    """Names of the DVC remotes configured for the workspace."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=root, env=stage_env(root),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def log_path_for(root: Path, name: str) -> Path:
    return root / LOG_DIR / (re.sub(r"[^A-Za-z0-9_.@-]", "_", name) + ".log")


# ---------------------------------------------------------------------------------------------------------------
# One run at a time per workspace. flock(2) is released by the kernel when the holder dies, so a crashed run
# never leaves a stale lock behind. Re-entrant within a process: the data flow holds it and runs the pipeline.
_held: dict[Path, list] = {}
_held_guard = threading.Lock()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode(errors="replace").strip())
        return (f"{info.get('what', 'a run')} (pid {info.get('pid')} on {info.get('host')}, "
                f"flow run {info.get('flow_run_id') or '-'}, started {info.get('since')})")
    except (json.JSONDecodeError, AttributeError):
        return "another run"


@contextlib.contextmanager
def workspace_lock(root: Path, what: str = "sslcook pipeline run", flow_run_id: str | None = None,
                   wait_seconds: float = 0.0, on_wait=None) -> Iterator[None]:
    """Hold the workspace for one run; another run waits up to ``wait_seconds``, then fails naming the holder."""
    import fcntl

    path = (root / LOCK_FILE).resolve()
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path][1] -= 1
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            who = _holder(fd)
            if time.monotonic() >= deadline:
                os.close(fd)
                waited = f" after waiting {wait_seconds:.0f}s" if wait_seconds else ""
                raise WorkspaceBusy(f"{root}: workspace busy{waited}: {who} holds {LOCK_FILE}; wait for it to "
                                    "finish (two runs on one workspace would corrupt it)") from None
            if on_wait is not None:
                on_wait(who)
                on_wait = None   # say it once
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "flow_run_id": flow_run_id,
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    with _held_guard:
        _held[path] = [fd, 1]
    try:
        yield
    finally:
        with _held_guard:
            del _held[path]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)   # releases the flock
