"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
arXiv 2104.02057): deep metric learning where the keys come from a momentum encoder and the negatives are the
other keys of the (global) batch, with no memory queue."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..heads import EMATeacher, build_mlp
from ..registry import register
from .base import SSLMethod


class MoCoV3Loss(nn.Module):
    """MoCo v3's contrastive loss (InfoNCE with the batch's keys as negatives, paper Algorithm 1):

        ctr(q, k) = 2 tau * 1/N sum_i -log( exp(q_i . k_i / tau) / sum_j exp(q_i . k_j / tau) )

    for l2-normalised queries q (online encoder + predictor) and keys k (momentum encoder), j over the N keys of
    the global batch. The factor 2 tau is the paper's (it makes the gradient scale independent of tau). The keys
    are constants: they come from the momentum encoder and are detached here. With ``gather_distributed`` each
    rank scores its own queries against the keys of every rank; its positives sit at ``rank * B + i``.
    The method symmetrises: L = ctr(q1, k2) + ctr(q2, k1).
    """

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"MoCo v3 temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        q = F.normalize(queries, dim=1)
        k = F.normalize(keys.detach(), dim=1)
        offset = 0
        if self.gather_distributed:
            k = distributed.gather_no_grad(k)
            offset = distributed.local_offset(q.shape[0])
        logits = q @ k.T / self.temperature
        positives = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, positives) * (2 * self.temperature)


@register("moco", family="deep_metric_learning")
class MoCoV3(SSLMethod):
    """Online: backbone -> projector -> predictor (queries); momentum encoder: EMA of backbone + projector (keys).

    Defaults (paper, ResNet setting): projector 3 layers 4096 hidden / 256 out with BN after every layer (the
    last one without affine parameters), predictor 2 layers 4096 hidden with no last BN; momentum following a
    cosine from 0.99 to 1; BYOL's asymmetric augmentations; LARS lr 0.3 x B/256, weight decay 1.5e-6, 10 warmup
    epochs. Temperature 0.2: the paper's ViT value (its ResNet runs use 1.0 with batch 4096); the Cookbook and the
    reference libraries' small-batch recipes use 0.2.
    """

    augment = "byol"
    optimizer: dict[str, Any] = {
        "name": "lars",
        "base_lr": 0.3,
        "weight_decay": 1.5e-6,
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
        projector_hidden_dim: int = 4096,
        predictor_hidden_dim: int = 4096,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = build_mlp(
            [backbone.feature_dim, projector_hidden_dim, projector_hidden_dim, projection_dim],
            last_batch_norm=True,
            last_batch_norm_affine=False,
        )
        self.predictor = build_mlp([projection_dim, predictor_hidden_dim, projection_dim])
        self.momentum_backbone = EMATeacher(backbone, base_momentum=base_momentum, final_momentum=final_momentum)
        self.momentum_projector = EMATeacher(self.projector, base_momentum=base_momentum, final_momentum=final_momentum)
        self.criterion = MoCoV3Loss(temperature, gather_distributed)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"moco needs 2 views, got {len(views)}")
        x = torch.cat(views[:2])
        z = self.projector(self.backbone(x))
        q1, q2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_projector(self.momentum_backbone(x)).chunk(2)
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        with torch.no_grad():
            positive_similarity = 0.5 * (F.cosine_similarity(q1, k2).mean() + F.cosine_similarity(q2, k1).mean())
        return {
            "loss": loss,
            "embedding": z.chunk(2)[0].detach(),
            "positive_similarity": positive_similarity,
            "target_momentum": torch.tensor(self.momentum_backbone.momentum),
        }

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.momentum_backbone.update(self.backbone, step, total_steps)
        self.momentum_projector.update(self.projector, step, total_steps)

    def teacher_modules(self) -> dict[str, nn.Module]:
        return {"momentum_backbone": self.momentum_backbone, "momentum_projector": self.momentum_projector}
