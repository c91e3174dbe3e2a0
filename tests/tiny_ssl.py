"""Tiny SSL pieces for the engine tests: a GroupNorm conv backbone, a BYOL-like method with an EMA teacher,
a method forced to collapse, and a synthetic loader whose augmentations draw from the global torch RNG
(as torchvision transforms do) so that the engine's separation of data and model randomness is exercised."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from ssl_models.methods.base import SSLMethod


class TinyBackbone(nn.Module):
    """Conv + GroupNorm (no batch statistics, so 2-rank DDP equals 1 process on the double batch)."""

    def __init__(self, in_chans: int = 1, width: int = 8):
        super().__init__()
        self.feature_dim = width
        self.config = {"name": "tiny", "in_chans": in_chans, "width": width}
        self.net = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=2, padding=1), nn.GroupNorm(2, width),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyMethod(SSLMethod):
    """Student projector predicts an EMA teacher's projection of the other view (per-sample loss).

    ``dropout`` makes the forward pass draw from the global RNG; ``nan_at_step`` forces a NaN loss.
    """

    def __init__(self, backbone: nn.Module, *, dim: int = 8, dropout: float = 0.1, momentum: float = 0.9,
                 nan_at_step: int | None = None):
        super().__init__()
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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, noise: float = 0.1, global_noise: bool = True):
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
            idx = order[s * per_step:(s + 1) * per_step][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
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
