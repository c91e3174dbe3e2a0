"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent", arXiv 2006.07733): self-distillation where an online
network with a predictor regresses the projection of an exponential-moving-average target network."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
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


class DirectPredictor(nn.Module):
    """DirectPred (Tian, Chen & Ganguli 2021, "Understanding self-supervised learning dynamics without contrastive
    pairs", arXiv 2102.06810, section 5): BYOL's predictor as a linear map that is not trained but set at every
    training step from the running correlation of its inputs (the online projections ``z``):

        F <- rho F + (1 - rho) E[z z^T],   F = U diag(s) U^T,   W_p = U diag(sqrt(s / max s) + eps) U^T,

    and the prediction is ``W_p z``. The paper's analysis shows a trained predictor converges to this
    eigenspace-aligned form; setting it directly skips the slow alignment phase, which matters when a run has a
    few hundred steps (BYOL's MLP predictor on 28x28 digits stays near a random backbone in that budget).
    ``eps`` boosts the weak eigendirections (the paper uses 0.1-0.3), ``rho`` is the correlation's EMA decay (0.3).

    Only training-mode calls update F (from the global batch under DDP, so every rank sets the same W_p); the
    first call starts F from its batch. F and W_p are buffers: checkpoints and resumes carry them.
    """

    def __init__(self, dim: int, *, eps: float = 0.1, rho: float = 0.3) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"DirectPredictor: dim must be >= 1, got {dim}")
        if eps < 0:
            raise ValueError(f"DirectPredictor: eps must be >= 0, got {eps}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"DirectPredictor: rho must be in [0, 1), got {rho}")
        self.eps = float(eps)
        self.rho = float(rho)
        self.register_buffer("correlation", torch.zeros(dim, dim))
        self.register_buffer("weight", torch.eye(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Fold the batch's correlation E[z z^T] into F and recompute W_p (float32, autocast off)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.detach().float()
            batch_corr = distributed.all_reduce_mean(z.T @ z / z.shape[0]).to(self.correlation)
            rho = self.rho if int(self.updates) > 0 else 0.0
            self.correlation.mul_(rho).add_(batch_corr, alpha=1.0 - rho)
            eigvals, eigvecs = torch.linalg.eigh(self.correlation)
            eigvals = eigvals.clamp(min=0.0)
            gains = (eigvals / eigvals.max().clamp(min=torch.finfo(eigvals.dtype).tiny)).sqrt() + self.eps
            self.weight.copy_((eigvecs * gains) @ eigvecs.T)
            self.updates += 1

    def forward(self, z: Tensor) -> Tensor:
        if self.training:
            self.update(z)
        # a copy: a later in-place update must not change the weight this step's backward multiplies by
        return z @ self.weight.clone().to(z.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eps={self.eps}, rho={self.rho}"


PREDICTORS = ("mlp", "direct")


@register("byol", family="self_distillation")
class BYOL(SSLMethod):
    """Online: backbone -> projector -> predictor; target: EMA copy of backbone + projector.

    The loss is symmetrised, L = L(p_1, z'_2) + L(p_2, z'_1) (paper, section 3.1). Target momentum follows
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2. Defaults: projector and predictor 4096 hidden / 256 out with
    BN; LARS lr 0.2 x B/256, weight decay 1.5e-6 (without decay BYOL is unstable), 10 warmup epochs.
    tau_base 0.99: the paper's 0.996 is tuned for 1000 ImageNet epochs; short CIFAR-scale runs need the teacher
    to move faster (the paper's 300-epoch setting and the reference libraries use 0.99).

    ``predictor="direct"`` replaces the trained MLP predictor with DirectPred's (Tian et al. 2021): a linear map set
    at every step from the eigendecomposition of the online projections' correlation
    (:class:`DirectPredictor`, with ``direct_pred_eps`` and ``direct_pred_rho``);
    ``predictor_hidden_dim`` is then unused. It learns much faster in short runs.
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
        projection_dim: int = 256,
        projector_hidden_dim: int = 4096,
        predictor_hidden_dim: int = 4096,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        predictor: str = "mlp",
        direct_pred_eps: float = 0.1,
        direct_pred_rho: float = 0.3,
    ) -> None:
        super().__init__()
        if predictor not in PREDICTORS:
            raise ValueError(f"byol: predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
        self.backbone = backbone
        self.projector = build_mlp([backbone.feature_dim, projector_hidden_dim, projection_dim])
        if predictor == "direct":
            self.predictor = DirectPredictor(projection_dim, eps=direct_pred_eps, rho=direct_pred_rho)
        else:
            self.predictor = build_mlp([projection_dim, predictor_hidden_dim, projection_dim])
        self.target_backbone = EMATeacher(backbone, base_momentum=base_momentum, final_momentum=final_momentum)
        self.target_projector = EMATeacher(self.projector, base_momentum=base_momentum, final_momentum=final_momentum)
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
        return {
            "loss": loss,
            "embedding": z.chunk(2)[0].detach(),
            "target_momentum": torch.tensor(self.target_backbone.momentum),
        }

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.target_backbone.update(self.backbone, step, total_steps)
        self.target_projector.update(self.projector, step, total_steps)

    def teacher_modules(self) -> dict[str, nn.Module]:
        return {"target_backbone": self.target_backbone, "target_projector": self.target_projector}
