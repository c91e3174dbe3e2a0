"""Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", arXiv 2103.03230): canonical correlation analysis. The cross-correlation matrix of the two views'
embeddings is pushed towards the identity: invariant features, decorrelated from one another."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..heads import build_mlp
from ..registry import register
from .base import SSLMethod


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins' loss (paper eq. 1-2):

        L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,
        C_ij = sum_b zA_bi zB_bj / N

    where zA, zB (N x D) are the two views' embeddings, each standardised per dimension over the global batch
    of N samples (mean 0, variance 1: the official code's affine-free BatchNorm, biased variance + eps), so C is
    their cross-correlation matrix. Identical views give C_ii = 1; a constant embedding gives C = 0 and L = D.
    With ``gather_distributed`` the embeddings of every rank are gathered with gradients and every rank computes
    the same loss on the global batch.
    """

    def __init__(self, lambda_offdiag: float = 0.0051, eps: float = 1e-5, gather_distributed: bool = True) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"Barlow Twins lambda_offdiag must be >= 0, got {lambda_offdiag}")
        self.lambda_offdiag = lambda_offdiag
        self.eps = eps
        self.gather_distributed = gather_distributed

    def standardise(self, z: Tensor) -> Tensor:
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # statistics in full precision under autocast
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + self.eps)

    def cross_correlation(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.gather_distributed:
            z1, z2 = distributed.gather(z1), distributed.gather(z2)
        if z1.shape[0] < 2:
            raise ValueError("Barlow Twins needs a batch of at least 2 samples (standardisation over the batch)")
        # outside autocast: C's entries are averages of N products whose squares are summed D^2 times
        with torch.autocast(z1.device.type, enabled=False):
            return self.standardise(z1).T @ self.standardise(z2) / z1.shape[0]

    def terms(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        """The unweighted invariance (on-diagonal) and redundancy-reduction (off-diagonal) terms, and mean C_ii."""
        c = self.cross_correlation(z1, z2)
        diagonal = torch.diagonal(c)
        return {
            "on_diagonal": (1 - diagonal).pow(2).sum(),
            "off_diagonal": c.pow(2).sum() - diagonal.pow(2).sum(),
            "mean_diagonal_correlation": diagonal.mean(),
        }

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        return terms["on_diagonal"] + self.lambda_offdiag * terms["off_diagonal"]

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.combine(self.terms(z1, z2))


@register("barlowtwins", family="canonical_correlation_analysis")
class BarlowTwins(SSLMethod):
    """Backbone -> projector (3 layers, BN + ReLU, plain last layer) -> cross-correlation loss of the two views.

    Defaults: lambda 0.0051 (paper, section 4: "lambda = 5e-3"), BYOL's augmentations, LARS lr 0.2 x B/256,
    weight decay 1.5e-6, 10 warmup epochs. Projector 2048-2048-2048: the paper's 8192 is for ImageNet ResNet-50
    (its ablation shows the loss keeps improving with width, at a quadratic cost in the D x D matrix); CIFAR
    reproductions use 2048.
    """

    augment = "byol"
    optimizer: dict[str, Any] = {
        "name": "lars",
        "base_lr": 0.2,
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
        projection_dim: int = 2048,
        projector_hidden_dim: int = 2048,
        projector_layers: int = 3,
        lambda_offdiag: float = 0.0051,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if projector_layers < 1:
            raise ValueError(f"barlowtwins: projector_layers must be >= 1, got {projector_layers}")
        self.backbone = backbone
        dims = [backbone.feature_dim] + [projector_hidden_dim] * (projector_layers - 1) + [projection_dim]
        self.projector = build_mlp(dims)
        self.criterion = BarlowTwinsLoss(lambda_offdiag, gather_distributed=gather_distributed)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"barlowtwins needs 2 views, got {len(views)}")
        z1, z2 = self.projector(self.backbone(torch.cat(views[:2]))).chunk(2)
        terms = self.criterion.terms(z1, z2)
        loss = self.criterion.combine(terms)
        return {"loss": loss, "embedding": z1.detach(), **{k: v.detach() for k, v in terms.items()}}
