"""Helpers for the data tests: light workspaces (no git/dvc) with params overrides, image bytes, shard reading."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from support import PROJECT_ROOT


def set_params(ws: Path, **dotted: Any) -> None:
    """Override params.yaml keys given as ``data__image_mode="RGB"`` (double underscore = dot)."""
    path = ws / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        node = params
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def light_workspace(path: Path, **dotted: Any) -> Path:
    """A workspace with the project's params.yaml (plus overrides) and nothing else: for in-process stages."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "params.yaml", path / "params.yaml")
    if dotted:
        set_params(path, **dotted)
    return path


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def noise_rgb(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def read_shards(shards_dir: Path, split: str) -> list[dict[str, bytes]]:
    """Every sample of a split's shards as {extension: bytes}, in shard order (tar read directly, not the loader)."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards_dir / shard["name"]) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key.encode()})[ext] = tf.extractfile(member).read()
    return list(samples.values())


def pixels(data: bytes, mode: str) -> np.ndarray:
    """C x H x W uint8 pixels of encoded image bytes, decoded by Pillow (the reference decoder in tests)."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
