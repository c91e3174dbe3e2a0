"""What the flows need from DVC: the stage plan, running a DVC command with its log, what DVC did with a stage,
remotes, the workspace lock.

The flows never redefine the pipeline: the stage list and its order come from DVC's own planner (the order
``dvc repro`` uses), and each stage runs through ``dvc repro --single-item``, so DVC decides what is up to date.
What it did is read from its structured state (``dvc status`` of the stage, its run cache, dvc.lock), never from
the wording of its log. Nothing here imports Prefect.
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
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.workspace.common import WATCH_ENV, ConfigError, SslcookError, is_workspace, process_identity, workspace


def prefect_defaults() -> None:
    """Settings the flows want before Prefect is imported (an explicit environment variable still wins).

    The temporary server that in-process runs start is given 20 s by default; on a busy 2-core machine it can
    need more, and a pipeline run should not fail for that.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


STOP_GRACE_SECONDS = 30.0  # an interrupted stage's time to stop cleanly before it is killed
LOCK_FILE = Path(".dvc") / "tmp" / "sslcook-workspace.lock"
LOG_DIR = Path(".dvc") / "tmp" / "sslcook-logs"  # DVC's tmp dir: git-ignored, per workspace


class WorkspaceBusy(SslcookError):
    """Another pipeline run (or sweep) holds the workspace."""


class StageFailed(SslcookError):
    """A DVC stage kept failing; the message names it and quotes the tail of its log."""


@dataclass
class DvcResult:
    returncode: int
    log_path: Path | None
    head: str  # the first 64 KiB of the output: DVC says there whether it ran or skipped the stage
    tail: str  # the last lines of the output


def resolve_root(path: str | os.PathLike | None = None) -> Path:
    """The workspace to run in: ``path``, else $SSLCOOK_WORKSPACE, else the current directory."""
    root = Path(path).expanduser().resolve() if path else workspace()
    if not (root / "dvc.yaml").exists():
        raise ConfigError(f"{root / 'dvc.yaml'}: file not found (not a pipeline workspace)")
    if not is_workspace(root):
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


def run_dvc(
    args: Sequence[str],
    root: Path,
    *,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    echo: bool = False,
    tail_lines: int = 30,
    append: bool = False,
) -> DvcResult:
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
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
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


@dataclass
class StageState:
    """What DVC knows of a stage before it runs: the facts its outcome is read from afterwards."""

    changed: bool  # `dvc status` lists it: DVC will run it (or restore it from the run cache)
    cached_run: bool  # DVC's run cache holds the outputs of its current command, deps and params
    lock: Any  # its dvc.lock entry (for a data source: its .dvc file)


def _lock_entry(root: Path, address: str) -> Any:
    """The stage's record as DVC last wrote it: its dvc.lock entry, or the text of a .dvc file."""
    if address.endswith(".dvc"):
        path = root / address
        return path.read_text() if path.is_file() else None
    dvcfile, _, name = address.rpartition(":")
    lock = root / Path(dvcfile).parent / "dvc.lock" if dvcfile else root / "dvc.lock"
    try:
        doc = yaml.safe_load(lock.read_text()) if lock.is_file() else None
    except yaml.YAMLError:
        return None
    return ((doc or {}).get("stages") or {}).get(name)


def _in_run_cache(repo, stage) -> bool:
    """Whether DVC's run cache holds a run of ``stage`` with its deps' and params' current values (then
    ``dvc repro`` restores its outputs instead of running it)."""
    from dvc.exceptions import DvcException
    from dvc.stage.cache import _can_hash

    if not _can_hash(stage):  # no deps or outs, or always changed: DVC's repro never restores it from the cache
        return False
    try:
        stage.save_deps()  # the deps' current hashes (in memory): the run cache is keyed by them
        entry = repo.stage_cache._load(stage)  # DVC's own lookup (the one `repro` does), not re-implemented
    except DvcException:
        return False
    return bool(entry)


def stage_state(root: Path, address: str) -> StageState:
    """``dvc status`` of one stage (the structure ``dvc status --json`` prints), whether DVC's run cache could
    restore it, and its dvc.lock entry, read in-process just before the stage runs."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        stages = [stage for stage, _ in repo.stage.collect_granular(_absolute_target(root, address))]
        changed = any(stage.status() for stage in stages)
        cached = changed and bool(stages) and all(_in_run_cache(repo, stage) for stage in stages)
    return StageState(changed, cached, _lock_entry(root, address))


def stage_outcome(address: str, before: StageState, forced: bool = False) -> str:
    """What DVC did with a stage, from its status before the run: ran | restored (from the run cache) |
    skipped (up to date) | checked (a data source, data.dvc, whose data DVC verified)."""
    if forced:
        return "ran"
    if not before.changed:
        return "skipped"
    if address.endswith(".dvc"):
        return "checked"
    return "restored" if before.cached_run else "ran"


def lock_changed(root: Path, address: str, before: StageState) -> bool:
    """Whether the run changed the stage's dvc.lock entry (its .dvc file for a data source)."""
    return _lock_entry(root, address) != before.lock


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
            return (
                [_address(root, stage) for stage in plan_repro(graph, selected)],
                [_address(root, stage) for stage in selected],
            )
    except DvcException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"dvc.yaml: {first}") from None


def remotes(root: Path) -> list[str]:
    """Names of the DVC remotes configured for the workspace."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "list"], cwd=root, env=stage_env(root), capture_output=True, text=True
    )
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def log_path_for(root: Path, name: str) -> Path:
    return root / LOG_DIR / (re.sub(r"[^A-Za-z0-9_.@-]", "_", name) + ".log")


# ---------------------------------------------------------------------------------------------------------------
# One run at a time per workspace: an OS file lock (filelock: flock(2) on Unix), which the kernel releases when the
# holder dies, so a crashed run never leaves a stale lock. Re-entrant within a process (one lock object per path,
# shared by threads): the data flow holds it and runs the pipeline flow inside.


def _holder(path: Path) -> str:
    """Who holds the lock, from the note its holder wrote into the lock file."""
    try:
        info = json.loads(path.read_text(errors="replace").strip())
        return (
            f"{info.get('what', 'a run')} (pid {info.get('pid')} on {info.get('host')}, "
            f"flow run {info.get('flow_run_id') or '-'}, started {info.get('since')})"
        )
    except (OSError, json.JSONDecodeError, AttributeError):
        return "another run"


def _acquire(lock, root: Path, wait_seconds: float, on_wait) -> None:
    """Take ``lock`` now, else say who holds it (``on_wait``) and wait up to ``wait_seconds``; then fail."""
    from filelock import Timeout

    path = Path(lock.lock_file)
    try:
        lock.acquire(blocking=False)
        return
    except Timeout:
        who = _holder(path)
    if wait_seconds > 0:
        if on_wait is not None:
            on_wait(who)
        try:
            lock.acquire(timeout=wait_seconds, poll_interval=0.5)
            return
        except Timeout:
            who = _holder(path)
    waited = f" after waiting {wait_seconds:.0f}s" if wait_seconds else ""
    raise WorkspaceBusy(
        f"{root}: workspace busy{waited}: {who} holds {LOCK_FILE}; wait for it to finish "
        "(two runs on one workspace would corrupt it)"
    ) from None


@contextlib.contextmanager
def workspace_lock(
    root: Path,
    what: str = "sslcook pipeline run",
    flow_run_id: str | None = None,
    wait_seconds: float = 0.0,
    on_wait=None,
) -> Iterator[None]:
    """Hold the workspace for one run; another run waits up to ``wait_seconds``, then fails naming the holder."""
    from filelock import FileLock

    path = (root / LOCK_FILE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False, is_singleton=True)
    nested = lock.is_locked  # this process holds it already: the outer run's note stays
    _acquire(lock, root, wait_seconds, on_wait)
    try:
        if not nested:
            info = {
                "what": what,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "flow_run_id": flow_run_id,
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            with open(path, "r+") as note:  # the lock's own file, opened without truncating it first
                note.truncate()
                note.write(json.dumps(info))
        yield
    finally:
        if not nested:
            with contextlib.suppress(OSError), open(path, "r+") as note:
                note.truncate()
        lock.release()
