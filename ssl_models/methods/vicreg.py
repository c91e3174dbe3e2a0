"""VICReg (Bardes, Ponce & LeCun 2022, "Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", arXiv 2105.04906): canonical correlation analysis without negatives or a teacher."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..heads import build_mlp
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


class VICRegLoss(nn.Module):
    """VICReg's loss on the embeddings Z, Z' (n x d) of the two views, as the official code computes it:

        l(Z, Z') = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]

    invariance  s = mean over samples and dimensions of (z_ij - z'_ij)^2 (the paper's pseudocode: F.mse_loss)
    variance    v(Z) = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps)), Var unbiased over the batch
    covariance  c(Z) = 1/d sum_{i != j} C(Z)_ij^2, C(Z) = 1/(n-1) sum_k (z_k - mean)(z_k - mean)^T

    The paper's eq. 6 sums the two variance terms; the official code (facebookresearch/vicreg, and lightly)
    averages them, and the published lambda = mu = 25, nu = 1 (gamma = 1, eps = 1e-4) were tuned with that code,
    so the average is what keeps those coefficients' balance (the sum behaves like mu = 50). With
    ``gather_distributed`` every term is computed on the global batch (as the official implementation does), so each
    rank gets the same loss.
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.gamma, self.eps = gamma, eps
        self.gather_distributed = gather_distributed

    def variance(self, z: Tensor) -> Tensor:
        std = torch.sqrt(z.var(dim=0) + self.eps)
        return F.relu(self.gamma - std).mean()

    @staticmethod
    def covariance(z: Tensor) -> Tensor:
        n, d = z.shape
        z = z - z.mean(dim=0)
        cov = (z.T @ z) / (n - 1)
        off_diagonal = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
        return off_diagonal / d

    @float32_loss
    def terms(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        """The three unweighted terms (variance averaged over the two views, covariance summed: official code)."""
        if self.gather_distributed:
            z1, z2 = distributed.gather(z1), distributed.gather(z2)
        if z1.shape[0] < 2:
            raise ValueError("VICReg needs a batch of at least 2 samples (variance over the batch)")
        return {
            "invariance": F.mse_loss(z1, z2),
            "variance": (self.variance(z1) + self.variance(z2)) / 2,
            "covariance": self.covariance(z1) + self.covariance(z2),
        }

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        return (
            self.sim_coeff * terms["invariance"]
            + self.std_coeff * terms["variance"]
            + self.cov_coeff * terms["covariance"]
        )

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.combine(self.terms(z1, z2))


@register("vicreg", family="canonical_correlation_analysis")
class VICReg(SSLMethod):
    """Backbone -> expander (3-layer MLP, BN + ReLU, plain last layer) -> VICReg loss between the two views.

    Defaults: coefficients 25/25/1; expander 2048-2048-2048 (the paper's 8192 is for ImageNet ResNet-50; CIFAR
    reproductions use 2048); LARS lr 0.2 x B/256 (paper: base lr 0.2), weight decay 1e-6, 10 warmup epochs;
    BYOL's augmentations (the paper's appendix C.1).
    """

    augment = "byol"
    optimizer: dict[str, Any] = {
        "name": "lars",
        "base_lr": 0.2,
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
        expander_dim: int = 2048,
        expander_layers: int = 3,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if expander_layers < 1:
            raise ValueError(f"vicreg: expander_layers must be >= 1, got {expander_layers}")
        self.backbone = backbone
        self.projector = build_mlp([backbone.feature_dim] + [expander_dim] * expander_layers, batch_norm=True)
        self.criterion = VICRegLoss(sim_coeff, std_coeff, cov_coeff, gather_distributed=gather_distributed)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"vicreg needs 2 views, got {len(views)}")
        z1, z2 = self.projector(self.backbone(torch.cat(views[:2]))).chunk(2)
        terms = self.criterion.terms(z1, z2)
        loss = self.criterion.combine(terms)
        return {"loss": loss, "embedding": z1.detach(), **{k: v.detach() for k, v in terms.items()}}
