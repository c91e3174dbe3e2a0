"""Lineage records: every artifact says which data version, params, code and parents produced it.

Two kinds of facts, kept apart so that outputs are content-stable:

- the **lineage record** (:func:`make_record`): what identifies the content (stage, data version, params and
  their digest, seed, parents with their sha256, library versions). It goes into the hashed outputs: the shard
  manifest, ``runs/<m>/lineage.json`` and the checkpoint, the safetensors header of exported backbones, the
  metrics. Re-running a stage on unchanged inputs writes the same record, so DVC sees the same hash and nothing
  downstream goes stale (and pretrain's resume key, which hashes the manifest, stays the same).
- the **run provenance** (:func:`write_provenance`): what differs from one run of the same content to the next
  (time, git commit and dirty flag, Prefect flow run, host, wandb run id, durations, throughput). Each stage
  writes it to ``provenance/<stage>[/<method>].json``, an uncached DVC out that no stage lists as a dep and that
  git keeps like the metrics. It names the sha256 of the artifact it describes, so ``sslcook trace`` prints the
  commit, time and flow run of each step it can match.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ssl_models.files import sha256_file  # noqa: F401 (the stages' file digest is the library's)

from .common import workspace

DATA_DVC = "data.dvc"


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
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
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


def make_record(
    stage: str,
    *,
    params: Mapping[str, Any],
    parents: Mapping[str, str | os.PathLike] | None = None,
    seed: int | None = None,
    extra: Mapping[str, Any] | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """The content lineage record of an artifact made by ``stage`` from ``params`` and ``parents``.

    Nothing in it changes when the stage runs again on the same inputs (no time, commit or run id: those are
    the run's provenance, :func:`write_provenance`).
    """
    root = root or workspace()
    record: dict[str, Any] = {
        "stage": stage,
        "data_version": data_version(root),
        "params": dict(params),
        "params_digest": digest(dict(params)),
        "parents": {name: parent_entry(p, root) for name, p in (parents or {}).items()},
        "seed": seed,
        "versions": library_versions(),
    }
    if extra:
        record.update(extra)
    return record


# ----------------------------------------------------------------------------------------------- provenance
PROVENANCE_DIR = Path("provenance")
PROVENANCE_FORMAT = "sslcook.provenance/1"


def provenance_path(stage: str, method: str | None = None) -> Path:
    """provenance/<stage>.json, or provenance/<stage>/<method>.json for the per-method stages."""
    return PROVENANCE_DIR / stage / f"{method}.json" if method else PROVENANCE_DIR / f"{stage}.json"


def flow_run_id() -> str | None:
    """The Prefect flow run driving this stage (flows/dvcops.py hands it over), None under a bare `dvc repro`."""
    return os.environ.get("PREFECT__FLOW_RUN_ID") or os.environ.get("SSLCOOK_FLOW_RUN_ID")


def run_provenance(root: Path | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The facts of this run that are not content: when, from which commit, under which flow run, where."""
    out: dict[str, Any] = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(root),
        "prefect_flow_run_id": flow_run_id(),
        "host": {"name": platform.node(), "machine": platform.machine(), "cpu": cpu_name()},
    }
    out.update(extra or {})
    return out


def cpu_name() -> str | None:
    """The CPU model and the torch kernel ISA in use: float results differ between CPU generations (BENCHMARKS.md)."""
    name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        name = platform.processor() or None
    try:
        import torch

        return f"{name or 'unknown'} (torch kernels {torch.backends.cpu.get_cpu_capability()})"
    except (ImportError, AttributeError):
        return name


def write_provenance(
    stage: str,
    artifact: str | os.PathLike,
    *,
    method: str | None = None,
    root: Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write provenance/<stage>[/<method>].json for ``artifact`` (its path and sha256 tie the two together)."""
    from .common import write_json

    root = root or workspace()
    doc = {
        "format": PROVENANCE_FORMAT,
        "stage": stage,
        "method": method,
        "artifact": parent_entry(artifact, root),
        **run_provenance(root, extra),
    }
    path = root / provenance_path(stage, method)
    write_json(path, doc)
    return path


def read_provenance(root: Path, stage: str | None, method: str | None, sha256: str | None) -> dict[str, Any] | None:
    """The provenance of the artifact with this sha256 made by ``stage`` (None: not recorded, or another version)."""
    if not stage or not sha256:
        return None
    path = root / provenance_path(stage, method)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or (doc.get("artifact") or {}).get("sha256") != sha256:
        return None
    return doc
