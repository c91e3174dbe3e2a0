"""export@<method>: runs/<method>/checkpoint.pt -> models/<method>/backbone.safetensors + model_card.json.

Only the backbone leaves (the one the pretrain stage saved as backbone_state: the method's ``exported_backbone()``,
the trained backbone except where the paper evaluates another, e.g. I-JEPA's target encoder): projector,
predictor, teacher and decoder stay in the checkpoint. The weights go to safetensors (no pickle); the header
carries the rebuild recipe (backbone_config), the input the backbone expects (size, channels, normalisation)
and the lineage record with its ancestors embedded, so the file alone is enough to load it
(``ssl_models.io.load_backbone``) and to trace it (``sslcook trace``). The model card repeats all that for humans,
with the training summary and where the downstream metrics will be. Both hold content only (exporting one
checkpoint twice gives byte-identical files); the export's time and commit go to provenance/export/<method>.json.

    python -m stages.export --method simclr
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

from .workspace.common import (
    ConfigError,
    DataError,
    atomic_path,
    describe_exception,
    manifest_image_size,
    read_json,
    run_main,
    workspace,
)
from .workspace.config import load_params
from .workspace.lineage import make_record, write_provenance
from .workspace.provenance import embed_ancestors

REQUIRED_KEYS = ("backbone_state", "backbone_config", "method", "family")
CARD_FORMAT = "sslcook.model_card/1"
SHARDS_MANIFEST = Path("data") / "shards" / "manifest.json"


def checkpoint_path(method: str) -> Path:
    return Path("runs") / method / "checkpoint.pt"


def model_dir(method: str) -> Path:
    return Path("models") / method


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The final checkpoint of a run, read without unpickling arbitrary objects."""
    import torch

    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found (run pretrain for this method first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        # whole: torch's reason keeps its warning that weights_only=False can run code
        raise DataError(f"{path}: not a loadable checkpoint ({describe_exception(exc)})") from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path}: a checkpoint must be a dict, got {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise DataError(f"{path}: checkpoint lacks {', '.join(missing)} (not a final pretrain checkpoint?)")
    return ckpt


def _find_augment(ckpt: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The view recipe the run trained with (image size, channels, grey mode, mean/std), wherever it was kept."""
    candidates: list[Any] = [
        ckpt.get("augment"),
        (ckpt.get("hparams") or {}).get("augment"),
        (ckpt.get("config") or {}).get("augment"),
    ]
    config_file = run_dir / "config.json"
    if config_file.is_file():
        try:
            cfg = json.loads(config_file.read_text())
            candidates += [cfg.get("augment"), (cfg.get("pretrain") or {}).get("augment")]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    for c in candidates:
        if isinstance(c, dict) and c.get("image_size"):
            return c
    return {}


def input_spec(ckpt: dict[str, Any], augment: dict[str, Any], ckpt_rel: Path, root: Path) -> dict[str, Any]:
    """What a user must feed the backbone: channels, square size, and the normalisation of pretraining."""
    from ssl_models.augment import GREY_MEAN, GREY_STD, RGB_MEAN, RGB_STD

    if isinstance(ckpt.get("input"), dict) and ckpt["input"].get("image_size"):
        return dict(ckpt["input"])
    config = ckpt["backbone_config"]
    model_channels = int(config.get("in_chans", 3))
    manifest = root / SHARDS_MANIFEST
    image_size = (
        augment.get("image_size")
        or config.get("image_size")
        or (manifest_image_size(read_json(manifest)) if manifest.is_file() else None)
    )
    if not image_size:
        raise DataError(
            f"{ckpt_rel}: cannot tell the input size the backbone was trained at (no augment.image_size "
            f"in the checkpoint or config.json, no image size in {SHARDS_MANIFEST})"
        )
    default_mean, default_std = (RGB_MEAN, RGB_STD) if model_channels == 3 else (GREY_MEAN, GREY_STD)
    mean = [float(v) for v in augment.get("mean", default_mean)]
    std = [float(v) for v in augment.get("std", default_std)]
    if len(mean) == 1 and model_channels == 3:
        mean, std = mean * 3, std * 3
    return {
        "channels": model_channels,
        "data_channels": int(augment.get("channels", model_channels)),
        "grey": augment.get("grey", "skip"),
        "image_size": int(image_size),
        "mean": mean,
        "std": std,
        "recipe": augment.get("recipe"),
        "preprocess": "uint8 pixels / 255, resized to image_size, then (x - mean) / std per channel",
    }


def trained_backbone(ckpt: dict[str, Any], ckpt_rel: Path):
    """The backbone rebuilt from the checkpoint's backbone_config with its trained weights, in eval mode."""
    from ssl_models.backbones import build_backbone

    config = ckpt["backbone_config"]
    try:
        backbone = build_backbone(**config)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{ckpt_rel}: backbone_config cannot be built ({exc})") from None
    incompatible = backbone.load_state_dict(ckpt["backbone_state"], strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise DataError(
            f"{ckpt_rel}: backbone_state does not match backbone_config {config.get('name')}: "
            f"{len(incompatible.missing_keys)} missing, {len(incompatible.unexpected_keys)} unexpected "
            f"(e.g. {(incompatible.missing_keys + incompatible.unexpected_keys)[0]})"
        )
    return backbone.eval()


def model_card(
    method: str,
    ckpt: dict[str, Any],
    backbone,
    spec: dict[str, Any],
    augment: dict[str, Any],
    weights: dict[str, str],
    record: dict[str, Any],
) -> dict[str, Any]:
    """The backbone described for people: what it is, what it expects, how it was trained, where its metrics go."""
    summary = ckpt.get("summary") or {}
    return {
        "format": CARD_FORMAT,
        "method": method,
        "family": ckpt["family"],
        "architecture": ckpt["backbone_config"].get("name"),
        "backbone_config": ckpt["backbone_config"],
        "feature_dim": backbone.feature_dim,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "input": spec,
        # the view recipe of pretraining (build_views(**augment) shows what the method saw)
        "augment": augment,
        "training": {"summary": summary, "hparams": ckpt.get("hparams") or {}},
        # pretraining monitors are known now; the downstream numbers come from evaluate@<method>
        "metrics": {
            "pretraining": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
            "downstream": None,
            "downstream_file": f"metrics/{method}.json",
        },
        "weights": weights,
        "usage": "from ssl_models.io import load_backbone; backbone = load_backbone('backbone.safetensors')",
        "lineage": record,
    }


def export(method: str, root: Path | None = None) -> Path:
    from ssl_models.io import MODEL_CARD, save_backbone

    root = root or workspace()
    params = load_params(root / "params.yaml")
    if method not in params.methods:
        raise ConfigError(f"params.yaml: methods: {method!r} is not listed (listed: {', '.join(params.methods)})")
    ckpt_rel = checkpoint_path(method)
    ckpt = load_checkpoint(root / ckpt_rel)
    if ckpt["method"] != method:
        raise DataError(f"{ckpt_rel}: holds method {ckpt['method']!r}, not {method!r}")
    backbone = trained_backbone(ckpt, ckpt_rel)
    augment = _find_augment(ckpt, root / ckpt_rel.parent)
    spec = input_spec(ckpt, augment, ckpt_rel, root)
    record = make_record(
        "export",
        params={"method": method},
        parents={"checkpoint": ckpt_rel},
        seed=params.seed,
        extra={"method": method, "family": ckpt["family"]},
        root=root,
    )
    # the checkpoint's own record (and through it the shards') travels inside the backbone file
    record = embed_ancestors(record, root)

    out = root / model_dir(method)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        weights = tmp / "backbone.safetensors"
        digest = save_backbone(
            weights, backbone, {"input": spec, "method": method, "family": ckpt["family"], "lineage": record}
        )
        card = model_card(
            method,
            ckpt,
            backbone,
            spec,
            augment,
            {"file": weights.name, "format": "safetensors", "sha256": digest},
            record,
        )
        (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    write_provenance("export", model_dir(method) / "backbone.safetensors", method=method, root=root)
    print(
        f"export: {out.relative_to(root)}/backbone.safetensors ({ckpt['backbone_config'].get('name')}, feature dim "
        f"{backbone.feature_dim}, sha256 {digest[:12]})",
        file=sys.stderr,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.export", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="a method listed in params.yaml methods")
    args = parser.parse_args(argv)
    export(args.method)


if __name__ == "__main__":
    run_main(main)
