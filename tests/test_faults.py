"""Faults around the pipeline: a full disk, read-only outputs, a second writer, a folder swap, a killed CLI.

Each fault is one line naming the path (and the errno text), no traceback, and no partial file. Tests run as root
on the CI machines, where chmod does not stop a write: read-only folders are a read-only bind mount when the
machine allows one (else chmod when not root, else skipped) besides an injected EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import support.tiny_pipeline as tp
from stages import pretrain as stage
from stages.workspace import common
from stages.workspace.common import SslcookError, atomic_path, ensure_writable, run_main, write_json
from support.tiny_ssl import make_stage_workspace
from test_hostile_inputs import _image_tree, ingested, one_line_error, snapshot  # noqa: F401  (fixture)
from test_pretrain_stage import shards  # noqa: F401  (fixture)

ENV = {"PYTHONPATH": str(tp.PROJECT_ROOT)}


def _disk_full_after(monkeypatch, name: str, keep: int = 10) -> None:
    """Path.write_text of a file called ``name`` writes ``keep`` characters, then fails as a full disk does."""
    real = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == name:
            real(self, data[:keep], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ disk full
def test_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch, capsys):
    target = tmp_path / "metrics.json"
    write_json(target, {"top1": 0.9})
    before = target.read_bytes()
    _disk_full_after(monkeypatch, "metrics.json")
    with pytest.raises(OSError) as err:
        write_json(target, {"top1": 0.1, "pad": "x" * 1000})
    assert err.value.filename == str(target)
    assert target.read_bytes() == before and _leftovers(tmp_path) == []  # no partial file, no temporary left
    with pytest.raises(SystemExit) as code:
        run_main(lambda: write_json(target, {"top1": 0.2}))
    assert code.value.code == 1
    assert one_line_error(capsys.readouterr().err, str(target), "No space left on device")


def test_full_disk_in_the_pretrain_stage_is_one_line_and_leaves_no_partial_output(
    tmp_path,
    shards,  # noqa: F811
    monkeypatch,
    capsys,
):
    ws = make_stage_workspace(tmp_path / "ws", shards, methods=["simclr"])
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    _disk_full_after(monkeypatch, "metrics.json")
    with pytest.raises(SystemExit) as code:
        run_main(lambda: stage.main(["--method", "simclr"]))
    assert code.value.code == 1
    out = ws / "runs" / "simclr"
    one_line_error(capsys.readouterr().err, str(out / "metrics.json"), "No space left on device")
    assert not (out / "metrics.json").exists() and not (out / "checkpoint.pt").exists()
    assert _leftovers(out) == []


# ------------------------------------------------------------------------------------------- read-only dirs
@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made really read-only: a read-only bind mount as root (chmod does not bind root), else chmod."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("root without mount rights: no way to make a folder read-only here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_folder_is_named_before_anything_is_written(tmp_path):
    folder = tmp_path / "runs"
    with read_only(folder):
        with pytest.raises(SslcookError) as err:
            ensure_writable(folder)
        assert str(folder) in str(err.value) and (
            "Read-only file system" in str(err.value) or "Permission denied" in str(err.value)
        )
        with pytest.raises(OSError) as err:
            write_json(folder / "metrics.json", {"a": 1})
        assert err.value.errno in (errno.EROFS, errno.EACCES)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("which", ["runs", "resume"])
def test_pretraining_checks_its_output_and_checkpoint_folders_before_training(
    which,
    tmp_path,
    shards,  # noqa: F811
    monkeypatch,
    capsys,
):
    from ssl_models import engine

    ws = make_stage_workspace(tmp_path / "ws", shards, methods=["simclr"])
    bad = ws / ("runs" if which == "runs" else ".sslcook")
    real_mkstemp = common.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # an EROFS mount under ``bad``, injected: tests run as root
        if dir is not None and Path(dir).is_relative_to(bad):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(common.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(engine.Trainer, "fit", lambda self: pytest.fail("training started"))
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    with pytest.raises(SystemExit) as code:
        run_main(lambda: stage.main(["--method", "simclr"]))
    assert code.value.code == 1
    folder = ws / "runs" / "simclr" if which == "runs" else ws / stage.RESUME_DIR / "simclr"
    one_line_error(capsys.readouterr().err, str(folder), "Read-only file system")


# ------------------------------------------------------------------------------------------ workspace lock
def test_data_ingest_waits_for_no_one_and_never_replaces_data_under_a_running_pipeline(ingested, tmp_path):  # noqa: F811
    from flows.dvcops import workspace_lock

    tree = _image_tree(tmp_path / "new", classes=("x", "y"))
    before = snapshot(ingested, "data.dvc", "data/raw/**/*")
    with workspace_lock(ingested, "a pipeline run"):
        proc = tp.sh(
            [sys.executable, "-m", "flows.cli", "data", "ingest", "folder", "--path", str(tree)],
            ingested,
            check=False,
            env={**ENV, "SSLCOOK_WORKSPACE": str(ingested)},
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    one_line_error(proc.stderr, "workspace busy", "a pipeline run")
    assert snapshot(ingested, "data.dvc", "data/raw/**/*") == before


def test_folder_replace_never_leaves_the_target_missing(tmp_path):
    final = tmp_path / "raw"
    final.mkdir()
    (final / "v").write_text("0")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (final / "v").exists():
                missing.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 200):
            with atomic_path(final) as new:
                new.mkdir()
                (new / "v").write_text(str(i))
    finally:
        stop.set()
        watcher.join()
    assert (final / "v").read_text() == "199" and missing == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# ------------------------------------------------------------------------------------------- a killed CLI
def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sigkill_of_sslcook_run_stops_the_stage_it_started(tmp_path):
    """SIGKILL gives the CLI no chance to stop dvc's process group: the stage watches the CLI and stops itself."""
    ws = tmp_path / "ws"
    ws.mkdir()
    params = yaml.safe_load((tp.PROJECT_ROOT / "params.yaml").read_text())
    params["methods"] = ["simclr"]
    tp.write_params(ws, params)
    started = ws / "stage.pid"
    sleeper = (
        "import os, time; from stages.workspace.common import run_main; "
        f"open({str(started)!r}, 'w').write(str(os.getpid())); run_main(lambda: time.sleep(120))"
    )
    (ws / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"sleeper": {"cmd": f'python -c "{sleeper}"', "outs": ["out.txt"]}}})
    )
    tp.sh(["git", "init", "-q"], ws)
    tp.dvc(["init", "-q"], ws)
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    cli = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--no-prefect", "-q"],
        cwd=ws,
        env={**os.environ, **ENV, "PATH": path, "SSLCOOK_WORKSPACE": str(ws)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while not (started.exists() and started.read_text()) and time.monotonic() < deadline:
            assert cli.poll() is None, cli.stderr.read().decode()
            time.sleep(0.2)
        pid = int(started.read_text())
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        deadline = time.monotonic() + 30
        while not _dead(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _dead(pid), "the stage outlived the killed sslcook command"
    finally:
        with contextlib.suppress(Exception):
            cli.kill()
        if started.exists() and started.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(started.read_text()), signal.SIGKILL)


def test_stage_watch_is_keyed_to_the_process_not_just_its_pid():
    me = common.process_identity(os.getpid())
    assert common._alive(me)
    pid, start = me.split(":")
    assert not common._alive(f"{pid}:{int(start) + 1}")  # the same pid reused by a later process


def test_sigterm_stops_a_stage_only_while_it_runs_and_the_callers_handler_comes_back():
    """An in-process caller keeps its own SIGTERM handler after a stage, so processes it forks later do not
    inherit the stage's (which raises in whatever they are doing)."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with pytest.raises(common.Terminated), common.stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in the main thread before this ends
        assert calls == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_full_disk_during_ingest_keeps_the_earlier_data(ingested, tmp_path, monkeypatch, capsys):  # noqa: F811
    from test_hostile_inputs import cli

    tree = _image_tree(tmp_path / "new", classes=("x", "y"))
    before = snapshot(ingested, "data.dvc", "data/raw/**/*")
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.suffix == ".png" and "x" in self.parts:
            real(self, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    code, err = cli(monkeypatch, capsys, ingested, "data", "ingest", "folder", "--path", str(tree))
    assert code == 1
    one_line_error(err, str(ingested / "data" / "raw"), "No space left on device")
    assert snapshot(ingested, "data.dvc", "data/raw/**/*") == before
    assert sorted(p.name for p in (ingested / "data").iterdir() if p.name.startswith(".raw")) == []
