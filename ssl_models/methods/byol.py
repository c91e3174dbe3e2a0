"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent", arXiv 2006.07733): self-distillation where an online
network with a predictor regresses the projection of an exponential-moving-average target network."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import EMATeacher, build_mlp
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


class BYOLLoss(nn.Module):
    """BYOL's regression loss (eq. 2): the squared distance of l2-normalised vectors,

        L(p, z') = || p / ||p|| - z' / ||z'|| ||^2 = 2 - 2 * <p, z'> / (||p|| ||z'||),

    averaged over the batch. ``z'`` comes from the target network and is treated as a constant (stop-gradient).
    """

    @float32_loss
    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


@register("byol", family="self_distillation")
class BYOL(SSLMethod):
    """Online: backbone -> projector -> predictor; target: EMA copy of backbone + projector.

    The loss is symmetrised, L = L(p_1, z'_2) + L(p_2, z'_1) (paper, section 3.1). Target momentum follows
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2. Defaults: projector and predictor 4096 hidden / 256 out with
    BN; LARS lr 0.2 x B/256, weight decay 1.5e-6 (without decay BYOL is unstable), 10 warmup epochs.
    tau_base 0.99: the paper's 0.996 is tuned for 1000 ImageNet epochs; short CIFAR-scale runs need the teacher
    to move faster (the paper's 300-epoch setting and the reference libraries use 0.99).
    """

    augment = "byol"
    optimizer: dict[str, Any] = {"name": "lars", "base_lr": 0.2, "weight_decay": 1.5e-6, "momentum": 0.9,
                                 "lr_scaling": "linear", "warmup_epochs": 10}
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 256, projector_hidden_dim: int = 4096,
                 predictor_hidden_dim: int = 4096, base_momentum: float = 0.99, final_momentum: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = build_mlp([backbone.feature_dim, projector_hidden_dim, projection_dim])
        self.predictor = build_mlp([projection_dim, predictor_hidden_dim, projection_dim])
        self.target_backbone = EMATeacher(backbone, base_momentum=base_momentum, final_momentum=final_momentum)
        self.target_projector = EMATeacher(self.projector, base_momentum=base_momentum,
                                           final_momentum=final_momentum)
        self.criterion = BYOLLoss()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"byol needs 2 views, got {len(views)}")
        x = torch.cat(views[:2])
        z = self.projector(self.backbone(x))
        p1, p2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_backbone(x)).chunk(2)
        loss = self.criterion(p1, t2) + self.criterion(p2, t1)
        return {"loss": loss, "embedding": z.chunk(2)[0].detach(),
                "target_momentum": torch.tensor(self.target_backbone.momentum)}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.target_backbone.update(self.backbone, step, total_steps)
        self.target_projector.update(self.projector, step, total_steps)

    def teacher_modules(self) -> dict[str, nn.Module]:
        return {"target_backbone": self.target_backbone, "target_projector": self.target_projector}
