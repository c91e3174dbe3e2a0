"""A tiny real pipeline for the export/evaluate/report/trace tests: mnist5k subset -> dvc repro, in seconds.

Everything runs through the real stages (``sslcook data ingest``, then ``dvc repro``: shard, pretrain, export,
evaluate, report) with params shrunk to a CPU-seconds budget: 10 train / 3 test digits per class, SimCLR for one
epoch on a width-4 ResNet-18, no affine augmentation (the slowest view op on CPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from support import PROJECT_ROOT

METHODS = ["simclr"]


def sh(cmd, cwd, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    # dvc.yaml says `python -m stages.X`: this interpreter must be the first python on PATH
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sslcook(args, cwd, check=True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "flows.cli", *args], cwd, check=check, env={"SSLCOOK_WORKSPACE": str(cwd)})


def dvc(args, cwd, check=True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], cwd, check=check)


def tiny_params(train_per_class: int = 10) -> dict:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["data"].update({"source": "mnist5k", "train_per_class": train_per_class, "test_per_class": 3})
    params["methods"] = list(METHODS)
    pre = params["pretrain"]
    pre.update({"epochs": 1, "batch_size": 50, "threads": 2})
    for block in params["method"].values():  # the default recipes' per-method budgets are not tiny
        block.pop("epochs", None)
        block.pop("batch_size", None)
    pre["backbone"] = {"name": "resnet18", "small_image": True, "width": 4}
    pre["augment"] = {"flip_prob": 0.0}
    pre["wandb"]["mode"] = "disabled"
    params["evaluate"]["projection_points"] = 50
    params["report"]["view_grid_images"] = 2
    return params


def write_params(ws: Path, params: dict) -> None:
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_workspace(ws: Path) -> Path:
    """git + dvc initialised, the project's code and dvc.yaml, tiny params, mnist5k subset ingested, committed."""
    ws.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", ws / "dvc.yaml")
    # the code is part of the workspace (dvc.yaml lists it in deps), as in a clone of the project
    for package in ("flows", "stages", "ssl_models"):
        shutil.copytree(PROJECT_ROOT / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(ws, tiny_params())
    sh(["git", "init", "-q"], ws)
    sh(["git", "config", "user.email", "test@example.com"], ws)
    sh(["git", "config", "user.name", "sslcook tests"], ws)
    dvc(["init", "-q"], ws)
    dvc(["config", "core.analytics", "false"], ws)
    sslcook(["data", "ingest"], ws)
    sh(["git", "add", "-A"], ws)
    sh(["git", "commit", "-qm", "tiny mnist5k subset"], ws)
    return ws


def repro_and_commit(ws: Path, message: str) -> str:
    dvc(["repro", "-q"], ws)
    sh(["git", "add", "-A"], ws)
    sh(["git", "commit", "-qm", message], ws)
    return sh(["git", "rev-parse", "HEAD"], ws).stdout.strip()


_BUILT: dict[str, dict] = {}


def shared_pipeline(tmp_path_factory) -> dict:
    """The run-1 workspace, built once per test session whichever test module asks first."""
    if "run1" not in _BUILT:
        ws = make_workspace(tmp_path_factory.mktemp("pipeline") / "ws")
        _BUILT["run1"] = {"ws": ws, "commit": repro_and_commit(ws, "run 1")}
    return _BUILT["run1"]
