"""Portable backbone files: safetensors weights whose header says how to rebuild the network.

An exported backbone is one ``.safetensors`` file (no pickle: tensors plus a string-to-string header).
The header holds, as JSON strings:

- ``backbone_config``: the keyword arguments of :func:`ssl_models.backbones.build_backbone`
  (``build_backbone(**config)`` rebuilds the architecture the weights belong to);
- ``feature_dim``: the width of ``forward(x)``;
- anything the exporter adds, e.g. ``input`` (channels, image size, normalisation), ``method``, ``family``
  and ``lineage`` (the record that lets ``sslcook trace`` follow a copied file back to its data).

So ``load_backbone(path)`` needs nothing but the file. A ``model_card.json`` beside the file, when present, must
agree with the header and the weights (same architecture, feature dim and file digest); a card describing other
weights is an error rather than a silent surprise.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import sha256_file

FORMAT = "sslcook.backbone/1"
MODEL_CARD = "model_card.json"
# header keys whose values are JSON (everything the exporter writes is JSON-encoded; these are the required ones)
RESERVED_KEYS = ("format", "backbone_config", "feature_dim")


class BackboneFileError(ValueError):
    """A backbone file (or its model card) that cannot be used; the message is one line naming the file."""


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def save_backbone(path: str | os.PathLike, backbone: nn.Module, metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``backbone``'s weights and rebuild recipe to ``path`` (atomically); return the file's sha256.

    ``backbone`` must carry ``.config`` (the ``build_backbone`` kwargs) and ``.feature_dim``. Each ``metadata``
    value is stored JSON-encoded in the header (safetensors headers hold strings only).
    """
    path = Path(path)
    config = getattr(backbone, "config", None)
    feature_dim = getattr(backbone, "feature_dim", None)
    if not isinstance(config, Mapping) or not isinstance(feature_dim, int):
        raise BackboneFileError(f"{path}: the backbone has no .config dict or no integer .feature_dim to export")
    header = {
        "format": FORMAT,
        "backbone_config": json.dumps(dict(config), sort_keys=True),
        "feature_dim": json.dumps(feature_dim),
    }
    for key, value in (metadata or {}).items():
        if key in RESERVED_KEYS:
            raise BackboneFileError(f"{path}: metadata key {key!r} is written from the backbone itself")
        header[key] = json.dumps(value, sort_keys=True, default=str)
    # safetensors refuses views and shared storage: give every tensor its own contiguous CPU copy
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        _canonical_header(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_file(path)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys: equal weights and metadata give byte-equal files.

    safetensors serialises the header from a hash map, whose order changes from one process to the next, so two
    exports of one checkpoint would differ in bytes (and in DVC hash) without this. The tensor data is untouched:
    its offsets are relative to the end of the header.
    """
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        data = fh.read()
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the 8-byte alignment safetensors itself keeps
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        fh.write(data)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded header metadata of a backbone file (reads the header only, not the weights)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneFileError(f"{path}: backbone file not found")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BackboneFileError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None
    header = {k: _json_value(v) for k, v in raw.items()}
    if not isinstance(header.get("backbone_config"), dict):
        raise BackboneFileError(f"{path}: no backbone_config in the safetensors header (not an sslcook backbone?)")
    if not isinstance(header.get("feature_dim"), int):
        raise BackboneFileError(f"{path}: no integer feature_dim in the safetensors header")
    return header


# What an exported header may ask for, checked before anything is built: the backbones of this library span far
# less (a CPU ResNet-18 is width 16, ViT-Small is 384 x 12), and a crafted header must not make the loader
# allocate what the file does not hold.
INT_LIMITS = {
    "in_chans": (1, 16),
    "width": (1, 1024),
    "stem_stride": (1, 2),
    "image_size": (2, 4096),
    "patch_size": (1, 256),
    "embed_dim": (1, 4096),
    "depth": (1, 48),
    "num_heads": (1, 64),
}
FLOAT_LIMITS = {"mlp_ratio": (0.25, 16.0)}
BOOL_KEYS = ("small_image", "zero_init_residual")
CHOICES = {"global_pool": ("cls", "mean"), "init": ("mae", "jepa")}
# bytes per element of the safetensors dtypes a state dict can hold
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_config(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse a backbone_config outside the registry and the limits above (one line naming the key)."""
    from .backbones import BACKBONE_NAMES

    name = config.get("name")
    if name not in BACKBONE_NAMES:
        raise BackboneFileError(
            f"{path}: backbone_config.name {name!r} is not a known backbone ({', '.join(BACKBONE_NAMES)})"
        )
    for key, value in config.items():
        if key == "name":
            continue
        if key in INT_LIMITS:
            lo, hi = INT_LIMITS[key]
            ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
            want = f"an integer in [{lo}, {hi}]"
        elif key in FLOAT_LIMITS:
            lo, hi = FLOAT_LIMITS[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
            want = f"a number in [{lo}, {hi}]"
        elif key in BOOL_KEYS:
            ok, want = isinstance(value, bool), "true or false"
        elif key in CHOICES:
            ok, want = value in CHOICES[key], " or ".join(CHOICES[key])
        else:
            raise BackboneFileError(f"{path}: backbone_config.{key}: unknown key")
        if not ok:
            raise BackboneFileError(f"{path}: backbone_config.{key}: {value!r} is out of bounds (want {want})")


def _file_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: (str(fh.get_slice(k).get_dtype()), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BackboneFileError(f"{path}: tensors cannot be listed ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_sizes(
    path: Path, skeleton: nn.Module, tensors: Mapping[str, tuple[str, tuple[int, ...]]], config: Mapping[str, Any]
) -> None:
    """The architecture's tensors (shapes from a weightless ``meta`` build) are the file's, byte for byte."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    _check_weights(path, expected, {k: shape for k, (_, shape) in tensors.items()}, config)
    implied = sum(v.numel() * v.element_size() for v in skeleton.state_dict().values())
    present = 0
    for key, (dtype, shape) in tensors.items():
        if dtype not in _DTYPE_BYTES:
            raise BackboneFileError(f"{path}: tensor {key}: dtype {dtype} is not a weight type")
        present += math.prod(shape) * _DTYPE_BYTES[dtype]
    if implied != present:
        raise BackboneFileError(
            f"{path}: backbone_config {_describe(config)} implies {implied} bytes of parameters, "
            f"the file holds {present}"
        )


def _describe(config: Mapping[str, Any]) -> str:
    return f"{config.get('name', '?')}(" + ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if k != "name") + ")"


def _check_weights(
    path: Path, expected: Mapping[str, tuple[int, ...]], state: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]
) -> None:
    """Tensor names and shapes of the architecture (``expected``) against the file's (``state``)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k]) != tuple(state[k]))
    if not (missing or unexpected or wrong_shape):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(
            f"{len(wrong_shape)} with another shape (e.g. {k}: file {tuple(state[k])}, "
            f"architecture {tuple(expected[k])})"
        )
    raise BackboneFileError(f"{path}: weights do not match backbone_config {_describe(config)}: " + "; ".join(parts))


def check_model_card(card_path: str | os.PathLike, header: Mapping[str, Any], weights_path: str | os.PathLike) -> dict:
    """Raise unless the model card describes these weights: same architecture, feature dim and file digest."""
    card_path, weights_path = Path(card_path), Path(weights_path)
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise BackboneFileError(f"{card_path}: model card not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackboneFileError(f"{card_path}: not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise BackboneFileError(f"{card_path}: a model card must be a JSON object")
    if card.get("backbone_config") != header["backbone_config"]:
        raise BackboneFileError(
            f"{card_path}: backbone_config {_describe(card.get('backbone_config') or {})} does not match the "
            f"weights in {weights_path.name} ({_describe(header['backbone_config'])})"
        )
    if card.get("feature_dim") != header["feature_dim"]:
        raise BackboneFileError(
            f"{card_path}: feature_dim {card.get('feature_dim')} does not match the weights in "
            f"{weights_path.name} ({header['feature_dim']})"
        )
    recorded = (card.get("weights") or {}).get("sha256")
    if recorded and recorded != sha256_file(weights_path):
        raise BackboneFileError(
            f"{card_path}: weights.sha256 {recorded[:12]}... is not the digest of "
            f"{weights_path.name} (card and weights come from different exports)"
        )
    return card


def load_backbone(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    card: str | os.PathLike | None | bool = True,
    expected_feature_dim: int | None = None,
) -> nn.Module:
    """Rebuild the backbone stored at ``path`` from its header and load its weights strictly; eval mode.

    ``card``: True checks ``model_card.json`` beside the file when there is one, a path checks that card,
    False skips the check. ``expected_feature_dim`` guards callers that were built for a given width.
    The returned module carries the decoded header as ``.export_header``.
    """
    path = Path(path)
    header = read_header(path)
    config = header["backbone_config"]
    if card is True:
        card_path = path.parent / MODEL_CARD
        if card_path.exists():
            check_model_card(card_path, header, path)
    elif card:
        check_model_card(card, header, path)

    from .backbones import build_backbone

    check_config(path, config)
    tensors = _file_tensors(path)

    def build() -> nn.Module:
        try:
            return build_backbone(**config)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise BackboneFileError(
                f"{path}: backbone_config {_describe(config)} cannot be built ({_one_line(exc)})"
            ) from None

    with torch.device("meta"):  # shapes without memory: the file must hold exactly what the config implies
        _check_sizes(path, build(), tensors, config)
    model = build()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BackboneFileError(f"{path}: weights cannot be read ({_one_line(exc)})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneFileError(f"{path}: weights cannot be loaded ({_one_line(exc)})") from None

    if model.feature_dim != header["feature_dim"]:
        raise BackboneFileError(
            f"{path}: header feature_dim {header['feature_dim']} but {_describe(config)} gives {model.feature_dim}"
        )
    if expected_feature_dim is not None and model.feature_dim != expected_feature_dim:
        raise BackboneFileError(f"{path}: feature dim {model.feature_dim}, expected {expected_feature_dim}")
    input_spec = header.get("input") if isinstance(header.get("input"), dict) else {}
    model.eval()
    if input_spec.get("channels") and input_spec.get("image_size"):
        check_config(
            path, {"name": config["name"], "in_chans": input_spec["channels"], "image_size": input_spec["image_size"]}
        )
        size = int(input_spec["image_size"])
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, int(input_spec["channels"]), size, size))
        except RuntimeError as exc:
            raise BackboneFileError(
                f"{path}: the header's input ({input_spec['channels']} channels, {size} px) "
                f"does not fit {_describe(config)} ({_one_line(exc)})"
            ) from None
        if tuple(out.shape) != (1, model.feature_dim):
            raise BackboneFileError(
                f"{path}: forward gives shape {tuple(out.shape)[1:]} per image, header says "
                f"feature_dim {model.feature_dim}"
            )
    model.export_header = header
    return model.to(device)


__all__ = [
    "BackboneFileError",
    "FORMAT",
    "MODEL_CARD",
    "check_model_card",
    "load_backbone",
    "read_header",
    "save_backbone",
]
