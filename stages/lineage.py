"""Lineage records: every artifact says which data version, params, code and parents produced it.

A record is a plain JSON-able dict (see :func:`make_record`). Stages store it beside their outputs
(``lineage.json``), inside checkpoints and in the safetensors header of exported backbones, and
``sslcook trace`` walks the ``parents`` links back to the raw data version and the git commit.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping

import yaml

from .common import workspace

DATA_DVC = "data.dvc"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys): equal params give equal digests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def data_version(root: Path | None = None) -> str | None:
    """md5 of data/raw as recorded in data.dvc (DVC's directory hash), or None when not tracked yet."""
    path = (root or workspace()) / DATA_DVC
    if not path.exists():
        return None
    try:
        doc = yaml.safe_load(path.read_text()) or {}
        return str(doc["outs"][0]["md5"])
    except (KeyError, IndexError, TypeError, yaml.YAMLError):
        return None


def git_info(root: Path | None = None) -> dict[str, Any]:
    """Current commit and whether tracked files differ from it (None outside a git checkout)."""
    cwd = str(root or workspace())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("sslcook", "torch", "torchvision", "webdataset", "dvc", "prefect", "wandb"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def parent_entry(path: str | os.PathLike, root: Path | None = None) -> dict[str, str]:
    """A reference to a parent artifact: its workspace-relative path and sha256 (or its lineage digest)."""
    root = root or workspace()
    p = Path(path)
    absolute = p if p.is_absolute() else root / p
    rel = os.path.relpath(absolute, root)
    entry = {"path": rel}
    if absolute.is_file():
        entry["sha256"] = sha256_file(absolute)
    return entry


def make_record(stage: str, *, params: Mapping[str, Any], parents: Mapping[str, str | os.PathLike] | None = None,
                seed: int | None = None, extra: Mapping[str, Any] | None = None,
                root: Path | None = None) -> dict[str, Any]:
    """Build the lineage record of an artifact made by ``stage`` from ``params`` and ``parents``."""
    root = root or workspace()
    record: dict[str, Any] = {
        "stage": stage,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_version": data_version(root),
        "params": dict(params),
        "params_digest": digest(dict(params)),
        "git": git_info(root),
        "parents": {name: parent_entry(p, root) for name, p in (parents or {}).items()},
        "seed": seed,
        "versions": library_versions(),
        "prefect_flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID") or os.environ.get("SSLCOOK_FLOW_RUN_ID"),
    }
    if extra:
        record.update(extra)
    return record
