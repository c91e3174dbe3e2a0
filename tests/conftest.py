"""Shared test setup: offline, sandboxed tool state, and small real image sets from ../shared/data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from support import PROJECT_ROOT

SHARED_DIR = (PROJECT_ROOT.parent / "shared").resolve()
CIFAR_ARCHIVE = SHARED_DIR / "data" / "cifar10-images.tar.gz"

# Tool state goes to a temp dir: no network, no writes to the user's home.
_STATE = Path(tempfile.mkdtemp(prefix="sslcook-test-state-"))
for _name, _sub in [
    ("WANDB_DIR", "wandb"),
    ("WANDB_CACHE_DIR", "wandb/cache"),
    ("WANDB_CONFIG_DIR", "wandb/config"),
    ("WANDB_DATA_DIR", "wandb/data"),
    ("PREFECT_HOME", "prefect"),
]:
    (_STATE / _sub).mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(_STATE / _sub)
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Subprocesses (dvc stages: `python -m stages.X`) must find this interpreter first.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


# The integration tier (.ci/run's second pytest call, `-m integration`): tests that drive real DVC pipelines, Prefect
# servers, SIGKILL'd runs or DDP/torchrun subprocesses. Most modules mark theirs in place; these are marked here,
# by module: None marks every test of the module, a set only the tests of those names (tests/test_layout.py checks
# that each name exists).
INTEGRATION = {
    "test_ddp": None,  # torchrun / spawned gloo ranks
    "test_flows": None,  # Prefect flows over real DVC pipelines
    "test_resume": None,  # SIGKILL of a training stage, then dvc repro
    "test_trace": None,  # the tiny pipeline, run twice
    "test_deploy": {
        "test_nightly_deployments_schedule_runs_and_a_worker_completes_one",
        "test_gpu_deployments_register_and_a_process_worker_runs_one",
    },  # a Prefect server and worker
    "test_report": {
        "test_pipeline_writes_metrics_backbone_and_report",
        "test_exported_backbone_gives_the_checkpoint_features",
        "test_stages_reject_bad_inputs_with_one_line",
    },  # the tiny pipeline
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = INTEGRATION.get(item.path.stem, ())
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def one_thread():
    """Tiny models and per-image transforms run single-threaded: on 2 shared cores a second OpenMP thread costs far
    more in synchronisation than it computes (measured 6-13x slower under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"{CIFAR_ARCHIVE} not present")
    return CIFAR_ARCHIVE


def extract_cifar_subset(archive: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """Extract the first N images per class (sorted names) of each split: dest/<split>/<class>/*.jpg."""
    wanted: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
    with tarfile.open(archive, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        for m in members:
            parts = Path(m.name).parts[-3:]
            if len(parts) == 3 and parts[0] in per_class:
                wanted.setdefault((parts[0], parts[1]), []).append(m)
        chosen = [
            (split, cls, m)
            for (split, cls), ms in sorted(wanted.items())
            for m in sorted(ms, key=lambda m: m.name)[: per_class[split]]
        ]
        # in archive order: a backward seek in a .tar.gz decompresses it again from the start
        for split, cls, m in sorted(chosen, key=lambda c: c[2].offset):
            out = dest / split / cls / Path(m.name).name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(m).read())
    return dest


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory, cifar_archive) -> Path:
    """A labelled folder of real CIFAR-10 images: train/<class>/ (30 each) and test/<class>/ (10 each)."""
    return extract_cifar_subset(cifar_archive, tmp_path_factory.mktemp("cifar_small"), {"train": 30, "test": 10})


@pytest.fixture(scope="session")
def cifar_tensors(cifar_small):
    """(images float 300x3x32x32 in [0,1], labels) from cifar_small's train split, for model tests."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((cifar_small / "train").glob("*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0, y


def run(cmd, cwd, check=True, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run a command, returning the completed process (stdout/stderr as text)."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A fresh pipeline workspace: git + dvc initialised, the project's params.yaml and dvc.yaml copied in."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        if (PROJECT_ROOT / name).exists():
            shutil.copy(PROJECT_ROOT / name, ws / name)
    run(["git", "init", "-q"], ws)
    run(["git", "config", "user.email", "test@example.com"], ws)
    run(["git", "config", "user.name", "sslcook tests"], ws)
    run([sys.executable, "-m", "dvc", "init", "-q"], ws)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], ws)
    return ws


@pytest.fixture(scope="session", autouse=True)
def _no_process_pool_in_the_test_runner():
    """In-process calls of the shard stage decode in the test runner itself, without a worker pool.

    The stage's pool is for its own process (``python -m stages.shard``, as `dvc repro` runs it, which the
    pipeline tests exercise). The test runner holds threads of earlier tests (Prefect's client, wandb, torch's
    pools), and pools forked from it were seen to hang at shutdown, so in-process calls map inline. Session
    scope: the module-scoped fixtures that shard are set up before any function-scoped patch would apply (CI
    hung in one). The pool's own test runs the stage in a fresh process.
    """
    import contextlib

    import stages.shard

    @contextlib.contextmanager
    def inline(workers):
        yield map

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages.shard, "_mapper", inline)
        yield
