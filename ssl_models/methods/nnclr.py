"""NNCLR (Dwibedi, Aytar, Tompson, Sermanet & Zisserman 2021, "With a Little Help from My Friends: Nearest-Neighbor
Contrastive Learning of Visual Representations", arXiv 2104.14548): deep metric learning whose positive for a
view is its nearest neighbour in a support set of past embeddings, not the other view itself."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..heads import build_mlp
from ..registry import register
from .base import SSLMethod


class NNCLRLoss(nn.Module):
    """NNCLR's InfoNCE (paper eq. 2) with nearest neighbours as anchors:

        L = 1/N sum_i -log( exp(NN(z_i, Q) . p_i+ / tau) / sum_k exp(NN(z_i, Q) . p_k+ / tau) )

    ``anchors`` are the (already looked-up) l2-normalised nearest neighbours NN(z_i, Q) of one view's
    projections: constants, since the support set Q holds detached past embeddings. ``positives`` are the
    predictor outputs p+ of the other view (normalised here); k runs over the global batch. With
    ``gather_distributed`` the p+ of every rank are gathered with gradients and rank r's positives sit at
    ``r * B + i``. The method symmetrises: L = (L(NN(z1), p2) + L(NN(z2), p1)) / 2.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NNCLR temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, anchors: Tensor, positives: Tensor) -> Tensor:
        a = F.normalize(anchors.detach(), dim=1)
        p = F.normalize(positives, dim=1)
        offset = 0
        if self.gather_distributed:
            p = distributed.gather(p)
            offset = distributed.local_offset(a.shape[0])
        logits = a @ p.T / self.temperature
        targets = torch.arange(a.shape[0], device=a.device) + offset
        return F.cross_entropy(logits, targets)


class SupportSet(nn.Module):
    """NNCLR's support set Q: a FIFO queue of l2-normalised past projections, and the nearest-neighbour lookup.

    The queue is a buffer (checkpointed with the method, so a resumed run continues with the same support set).
    Until the first push the set is empty and :meth:`nearest` returns the query itself (plain SimCLR-like
    positives for the very first step rather than random vectors). In distributed training every rank pushes the
    gathered batch, so all ranks hold the same queue.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"NNCLR support set size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """The support-set entry with the highest cosine similarity to each row of ``z`` (B x D), detached."""
        z = F.normalize(z.detach(), dim=1)
        n = int(self.filled)
        if n == 0:
            return z
        support = self.queue[:n]
        index = (z @ support.T).argmax(dim=1)
        return support[index]

    @torch.no_grad()
    def push(self, z: Tensor) -> None:
        """Insert rows (newest overwrite oldest); a batch larger than the queue keeps its last ``size`` rows."""
        z = F.normalize(z.detach(), dim=1)[-self.size :]
        n = z.shape[0]
        start = int(self.pointer)
        positions = (torch.arange(n, device=z.device) + start) % self.size
        self.queue[positions] = z.to(self.queue.dtype)
        self.pointer.fill_((start + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))


@register("nnclr", family="deep_metric_learning")
class NNCLR(SSLMethod):
    """Backbone -> projector (z) -> predictor (p); positive of view 1 = NN(z1) in the support set vs p2.

    After each optimisation step (``after_step``) the first view's projections of the global batch enter the
    support set, as in the paper. Defaults (paper, section 4): projector 3 layers 2048 hidden / 256 out with BN,
    predictor 4096 hidden, temperature 0.1, BYOL's augmentations, LARS lr 0.3 x B/256 (4.8 at batch 4096),
    weight decay 1e-6, 10 warmup epochs. Support set 16,384: the paper's 98,304 is sized for ImageNet's 1.28M
    images; a queue several times larger than a small dataset would hold mostly stale copies of each image.
    """

    augment = "byol"
    optimizer: dict[str, Any] = {
        "name": "lars",
        "base_lr": 0.3,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "lr_scaling": "linear",
        "warmup_epochs": 10,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projection_dim: int = 256,
        projector_hidden_dim: int = 2048,
        predictor_hidden_dim: int = 4096,
        temperature: float = 0.1,
        support_set_size: int = 16384,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = build_mlp(
            [backbone.feature_dim, projector_hidden_dim, projector_hidden_dim, projection_dim], last_batch_norm=True
        )
        self.predictor = build_mlp([projection_dim, predictor_hidden_dim, projection_dim])
        self.support_set = SupportSet(support_set_size, projection_dim)
        self.criterion = NNCLRLoss(temperature, gather_distributed)
        self.gather_distributed = gather_distributed
        self._pending: Tensor | None = None

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"nnclr needs 2 views, got {len(views)}")
        z = self.projector(self.backbone(torch.cat(views[:2])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        nn1, nn2 = self.support_set.nearest(z1), self.support_set.nearest(z2)
        loss = 0.5 * (self.criterion(nn1, p2) + self.criterion(nn2, p1))
        with torch.no_grad():
            if self.training:
                z1_all = distributed.gather_no_grad(z1) if self.gather_distributed else z1.detach()
                self._pending = z1_all
            # how far the borrowed positive is from the query itself: 1 would make NNCLR plain SimCLR; lower values
            # are the semantic variation the support set adds beyond augmentations
            neighbour_similarity = F.cosine_similarity(nn1, z1).mean()
        return {
            "loss": loss,
            "embedding": z1.detach(),
            "neighbour_similarity": neighbour_similarity,
            "support_set_filled": self.support_set.filled.float() / self.support_set.size,
        }

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        if self._pending is not None:
            self.support_set.push(self._pending)
            self._pending = None
