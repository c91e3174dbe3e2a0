"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning", arXiv 2011.10566):
self-distillation with neither negatives nor a momentum teacher; a predictor and a stop-gradient are enough to
avoid collapse (and without the predictor it collapses, the paper's section 4.2)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import build_mlp
from ..registry import register
from .base import SSLMethod


class NegativeCosineLoss(nn.Module):
    """SimSiam's symmetric loss (paper eq. 1-4):

        D(p, z) = -<p / ||p||, stopgrad(z) / ||z||>,    L = D(p1, z2) / 2 + D(p2, z1) / 2,

    each D averaged over the batch. The target z is a constant (detached here): the stop-gradient that the
    paper shows to be essential. Its minimum is -1 (prediction aligned with the target).
    """

    def forward(self, p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
        return 0.5 * (self.distance(p1, z2) + self.distance(p2, z1))

    @staticmethod
    def distance(p: Tensor, z: Tensor) -> Tensor:
        # in at least float32: under bf16 autocast a cosine near -1 keeps only ~3 significant digits
        full = torch.promote_types(p.dtype, torch.float32)
        return -F.cosine_similarity(p.to(full), z.detach().to(full), dim=-1).mean()


@register("simsiam", family="self_distillation")
class SimSiam(SSLMethod):
    """Backbone -> projector (z) -> predictor (p); L = D(p1, z2)/2 + D(p2, z1)/2 with the targets detached.

    Defaults (paper, section 3 and appendix): projector 3 layers 2048 with BN after each (the last one without
    affine parameters), predictor 2048 -> 512 -> 2048 bottleneck with BN on its hidden layer; SimCLR's
    augmentations; SGD momentum 0.9, lr 0.05 x B/256. Weight decay 5e-4 and no warmup: the paper's CIFAR setting
    (its ImageNet one uses 1e-4), which fits the small-image backbones this project defaults to.
    ``use_predictor=False`` removes the predictor (p = z): the paper's ablation that collapses, kept to exercise
    collapse detection.
    """

    augment = "simclr"
    optimizer: dict[str, Any] = {
        "name": "sgd",
        "base_lr": 0.05,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "lr_scaling": "linear",
        "warmup_epochs": 0,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projection_dim: int = 2048,
        projector_hidden_dim: int = 2048,
        predictor_hidden_dim: int = 512,
        use_predictor: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = build_mlp(
            [backbone.feature_dim, projector_hidden_dim, projector_hidden_dim, projection_dim],
            last_batch_norm=True,
            last_batch_norm_affine=False,
        )
        self.predictor = (
            build_mlp([projection_dim, predictor_hidden_dim, projection_dim]) if use_predictor else nn.Identity()
        )
        self.use_predictor = use_predictor
        self.criterion = NegativeCosineLoss()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"simsiam needs 2 views, got {len(views)}")
        z = self.projector(self.backbone(torch.cat(views[:2])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        loss = self.criterion(p1, z1, p2, z2)
        return {"loss": loss, "embedding": z1.detach()}
