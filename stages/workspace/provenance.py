"""Reading the lineage record of any pipeline artifact, and the ancestors it embeds.

Every artifact carries a record (:mod:`stages.workspace.lineage`): metrics files and shard manifests under "lineage",
checkpoints as a "lineage" entry, exported backbones in their safetensors header. :func:`read_artifact` finds it
whatever the file is; :func:`embed_ancestors` copies the records of an artifact's parents (recursively) into its
own record under "ancestors", so a file that leaves the workspace (a backbone sent to a colleague) still carries its
whole chain back to the raw data version and the commit.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import DataError, describe_exception

# parents followed first when a record has several: the main line result -> backbone -> checkpoint -> shards
MAIN_LINE = ("backbone", "model", "checkpoint", "shards", "manifest", "data")


@dataclass
class Artifact:
    kind: str  # metrics | backbone | model_card | checkpoint | manifest | lineage
    path: Path
    record: dict[str, Any]  # the lineage record (may be {} for an artifact that has none)
    info: dict[str, Any] = field(default_factory=dict)  # a few kind-specific facts worth printing


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def resolve_artifact_path(path: str | os.PathLike) -> Path:
    """A folder stands for the artifact inside it (models/M -> backbone.safetensors, data/shards -> manifest)."""
    path = Path(path)
    if path.is_dir():
        for name in ("backbone.safetensors", "manifest.json", "checkpoint.pt", "lineage.json"):
            if (path / name).is_file():
                return path / name
    return path


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Identify ``path`` and return its lineage record; one-line DataError for what it cannot read."""
    path = resolve_artifact_path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: a folder with no artifact sslcook knows (backbone, manifest, checkpoint)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from ssl_models.io import BackboneFileError, read_header

        try:
            header = read_header(path)
        except BackboneFileError as exc:
            raise DataError(str(exc)) from None
        info = {k: header[k] for k in ("method", "family", "feature_dim", "backbone_config") if k in header}
        return Artifact("backbone", path, header.get("lineage") or {}, info)
    if suffix in (".pt", ".pth", ".ckpt"):
        import pickle

        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            # whole: torch's reason keeps its warning that weights_only=False can run code
            raise DataError(f"{path}: not a loadable checkpoint ({describe_exception(exc)})") from None
        if not isinstance(ckpt, dict):
            raise DataError(f"{path}: a checkpoint must be a dict, got {type(ckpt).__name__}")
        info = {k: ckpt[k] for k in ("method", "family", "summary") if k in ckpt}
        return Artifact("checkpoint", path, ckpt.get("lineage") or {}, info)
    if suffix == ".json":
        doc = _json(path)
        if not isinstance(doc, dict):
            raise DataError(f"{path}: expected a JSON object")
        if "splits" in doc and "classes" in doc:
            info = {
                "data_version": doc.get("data_version"),
                "classes": len(doc.get("classes") or []),
                "counts": {s: v.get("count") for s, v in (doc.get("splits") or {}).items() if isinstance(v, dict)},
            }
            return Artifact("manifest", path, doc.get("lineage") or {}, info)
        if str(doc.get("format", "")).startswith("sslcook.model_card"):
            return Artifact(
                "model_card",
                path,
                doc.get("lineage") or {},
                {k: doc.get(k) for k in ("method", "family", "feature_dim")},
            )
        if "lineage" in doc:
            info = {k: doc[k] for k in ("method", "family", "primary_metric") if k in doc}
            if doc.get("primary_metric") in doc:
                info["value"] = doc[doc["primary_metric"]]
            return Artifact("metrics", path, doc["lineage"] if isinstance(doc["lineage"], dict) else {}, info)
        if "stage" in doc and "parents" in doc:
            return Artifact("lineage", path, doc)
        raise DataError(f"{path}: no lineage record in this JSON file (not an sslcook artifact)")
    raise DataError(
        f"{path}: unknown artifact type (expected metrics .json, .safetensors, checkpoint .pt or manifest.json)"
    )


def parent_order(parents: dict[str, Any]) -> list[str]:
    """Parent names, the main line first (backbone, checkpoint, shards ...), then the rest in name order."""
    names = list(parents)
    return sorted(names, key=lambda n: (MAIN_LINE.index(n) if n in MAIN_LINE else len(MAIN_LINE), n))


def embed_ancestors(record: dict[str, Any], root: Path, *, depth: int = 6) -> dict[str, Any]:
    """Copy of ``record`` whose "ancestors" hold the records of its parents (read from ``root``), recursively.

    A parent that already carries ancestors keeps them; a parent that cannot be read is left out (its path and
    digest stay in "parents").
    """
    record = copy.deepcopy(record)
    if depth <= 0:
        return record
    ancestors = dict(record.get("ancestors") or {})
    for name, entry in (record.get("parents") or {}).items():
        if name in ancestors or not isinstance(entry, dict) or not entry.get("path"):
            continue
        try:
            parent = read_artifact(root / entry["path"])
        except DataError:
            continue
        if parent.record:
            ancestors[name] = embed_ancestors(parent.record, root, depth=depth - 1)
    if ancestors:
        record["ancestors"] = ancestors
    return record


__all__ = ["Artifact", "MAIN_LINE", "embed_ancestors", "parent_order", "read_artifact", "resolve_artifact_path"]
