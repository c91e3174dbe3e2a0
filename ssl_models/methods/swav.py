"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski & Joulin 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", arXiv 2006.09882): canonical correlation analysis through online clustering.
The code (soft cluster assignment) of one view, made balanced over the batch by Sinkhorn-Knopp, is predicted
from another view ("swapped prediction")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..heads import Prototypes, build_mlp
from ..registry import register
from .base import SSLMethod
from .dino import at_least_float32, multicrop_features


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, *, epsilon: float = 0.05, iterations: int = 3, shared_scores: Tensor | None = None
) -> Tensor:
    """Codes Q (B x K) for prototype scores (B x K) on the transportation polytope (SwAV eq. 3, appendix A.1).

    Q is the entropic optimal transport of the samples onto K equally used prototypes,
    Q = Diag(u) exp(S / epsilon) Diag(v), found by alternately normalising (``iterations`` times) so that
    every prototype receives 1/K of the total mass and every sample 1/B; rows are then rescaled to sum to 1.
    The marginals run over the global batch: sums over samples are all-reduced across ranks.
    ``shared_scores`` (S x K) are extra samples that every rank holds identically (the queue): they take part
    in the marginals once, not once per rank, and get no codes back.
    """
    local = at_least_float32(scores.detach())
    shared = shared_scores.detach().to(local.dtype) if shared_scores is not None else local.new_zeros(0, local.shape[1])
    num_samples = local.shape[0] * distributed.get_world_size() + shared.shape[0]
    num_prototypes = local.shape[1]
    # exp(S / eps) overflows for small eps: shift by the global maximum (a constant factor, normalised away)
    shift = torch.cat([local, shared]).max()
    if distributed.is_distributed() and distributed.get_world_size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q_local = torch.exp((local - shift) / epsilon)
    q_shared = torch.exp((shared - shift) / epsilon)

    def per_prototype_mass() -> Tensor:  # sum over every sample of the global batch (and the queue)
        return distributed.all_reduce_sum(q_local.sum(dim=0)) + q_shared.sum(dim=0)

    total = per_prototype_mass().sum()
    q_local, q_shared = q_local / total, q_shared / total
    for _ in range(iterations):
        mass = per_prototype_mass()
        q_local = q_local / (mass * num_prototypes)
        q_shared = q_shared / (mass * num_prototypes)
        q_local = q_local / (q_local.sum(dim=1, keepdim=True) * num_samples)
        q_shared = q_shared / (q_shared.sum(dim=1, keepdim=True) * num_samples)
    return q_local * num_samples


class SwAVLoss(nn.Module):
    """SwAV's swapped prediction (paper eq. 1-2, multi-crop as in section 3.2):

        l(z_t, q_s) = -sum_k q_s^(k) log p_t^(k),   p_t^(k) = softmax_k(z_t . c_k / tau)
        L = 1/|A| sum_{s in A} 1/(V - 1) sum_{t != s} mean_batch l(z_t, q_s)

    over the V crops, with codes q_s computed (without gradient) by :func:`sinkhorn_knopp` only for the crops in
    A (the two global crops). ``crop_scores`` are z . c_k for l2-normalised z and prototypes c_k, one B x K
    tensor per crop, assignment crops first. ``queued_scores`` (one S x K per assignment crop, or None) are the
    scores of stored past embeddings, identical on every rank, that join the Sinkhorn marginals when the batch
    is small compared with K.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        num_assignment_crops: int = 2,
    ) -> None:
        super().__init__()
        if temperature <= 0 or sinkhorn_epsilon <= 0 or sinkhorn_iterations < 1 or num_assignment_crops < 1:
            raise ValueError(
                "SwAV: need temperature > 0, sinkhorn_epsilon > 0, sinkhorn_iterations >= 1 and "
                "num_assignment_crops >= 1"
            )
        self.temperature = temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.num_assignment_crops = num_assignment_crops

    def codes(self, scores: Tensor, shared_scores: Tensor | None = None) -> Tensor:
        return sinkhorn_knopp(
            scores, epsilon=self.sinkhorn_epsilon, iterations=self.sinkhorn_iterations, shared_scores=shared_scores
        )

    def forward(self, crop_scores: Sequence[Tensor], queued_scores: Sequence[Tensor | None] | None = None) -> Tensor:
        n_assign = self.num_assignment_crops
        if len(crop_scores) < max(2, n_assign):
            raise ValueError(f"SwAV needs at least {max(2, n_assign)} crops, got {len(crop_scores)}")
        log_probs = [F.log_softmax(at_least_float32(s) / self.temperature, dim=1) for s in crop_scores]
        loss = 0.0
        for s in range(n_assign):
            shared = queued_scores[s] if queued_scores is not None else None
            q = self.codes(crop_scores[s], shared)
            prediction_loss = sum((-q * log_probs[t]).sum(dim=1).mean() for t in range(len(crop_scores)) if t != s)
            loss = loss + prediction_loss / (len(crop_scores) - 1)
        return loss / n_assign


class EmbeddingQueue(nn.Module):
    """SwAV's optional queue: the last ``length`` embeddings of each assignment crop (global batch, gathered, so
    every rank holds the same queue: a checkpoint written by rank 0 resumes every rank correctly).

    Used only once full, as in the paper's code (a half-empty queue would feed zero rows to Sinkhorn).
    """

    def __init__(self, num_crops: int, length: int, dim: int) -> None:
        super().__init__()
        self.length = length
        self.register_buffer("embeddings", torch.zeros(num_crops, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def full(self) -> bool:
        return self.length > 0 and int(self.filled) >= self.length

    @torch.no_grad()
    def push(self, per_crop: Sequence[Tensor]) -> None:
        rows = per_crop[0].shape[0]
        keep = min(rows, self.length)
        positions = (torch.arange(keep, device=self.embeddings.device) + int(self.pointer)) % self.length
        for i, z in enumerate(per_crop):
            self.embeddings[i, positions] = z[-keep:].detach().to(self.embeddings.dtype)
        self.pointer.fill_((int(self.pointer) + keep) % self.length)
        self.filled.fill_(min(int(self.filled) + keep, self.length))


@register("swav", family="canonical_correlation_analysis")
class SwAV(SSLMethod):
    """Backbone -> projector -> l2-normalise -> prototypes; swapped prediction of Sinkhorn codes across crops.

    Defaults (paper, appendix A): projector 2048 hidden / 128 out, K = 3000 prototypes renormalised before every
    step and frozen for the first 1% of training (the paper's first 313 iterations, one epoch); temperature 0.1,
    Sinkhorn epsilon 0.05 with 3 iterations; codes from the 2 global crops; multi-crop augmentations;
    LARS lr 0.6 x B/256 (the paper's batch-256 setting), weight decay 1e-6, 10 warmup epochs.
    Queue: 3840 embeddings per assignment crop (the paper's small-batch setting) from 15% of training on
    (epoch 15 of 100); ``queue_length=0`` turns it off.
    """

    augment = "multicrop"
    optimizer: dict[str, Any] = {
        "name": "lars",
        "base_lr": 0.6,
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
        projection_dim: int = 128,
        projector_hidden_dim: int = 2048,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        num_assignment_crops: int = 2,
        queue_length: int = 3840,
        queue_start_frac: float = 0.15,
        freeze_prototypes_frac: float = 0.01,
    ) -> None:
        super().__init__()
        if queue_length < 0:
            raise ValueError(f"swav: queue_length must be >= 0, got {queue_length}")
        self.backbone = backbone
        self.projector = build_mlp([backbone.feature_dim, projector_hidden_dim, projection_dim])
        self.prototypes = Prototypes(projection_dim, num_prototypes)
        self.criterion = SwAVLoss(temperature, sinkhorn_epsilon, sinkhorn_iterations, num_assignment_crops)
        self.queue = EmbeddingQueue(num_assignment_crops, queue_length, projection_dim)
        self.num_prototypes = num_prototypes
        self.num_assignment_crops = num_assignment_crops
        self.queue_start_frac = queue_start_frac
        self.freeze_prototypes_frac = freeze_prototypes_frac
        self.prototypes_frozen = False
        self.queue_active = queue_length > 0 and queue_start_frac <= 0
        self._pending: list[Tensor] | None = None

    def prototype_scores(self, z: Tensor) -> Tensor:
        """z . c_k for every prototype. While the prototypes are frozen they enter detached, so they get no
        gradient at all (the paper's code sets their .grad to None); requires_grad stays untouched, so an optimizer
        or DDP built at the start sees the same parameter set."""
        weight = self.prototypes.layer.weight
        return F.linear(z, weight.detach() if self.prototypes_frozen else weight)

    @property
    def collapse_loss_level(self) -> float:
        """ln K: the loss when every sample gets the same embedding (uniform codes, uniform predictions)."""
        return math.log(self.num_prototypes)

    def on_train_start(self, total_steps: int) -> None:
        self.before_step(0, total_steps)

    def before_step(self, step: int, total_steps: int) -> None:
        self.prototypes.normalize_()
        self.prototypes_frozen = step < self.freeze_prototypes_frac * total_steps
        self.queue_active = self.queue.length > 0 and step >= self.queue_start_frac * total_steps

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < max(2, self.num_assignment_crops):
            raise ValueError(f"swav needs at least {max(2, self.num_assignment_crops)} views, got {len(views)}")
        features = multicrop_features(self.backbone, views)
        sizes = [f.shape[0] for f in features]
        z = F.normalize(self.projector(torch.cat(features)), dim=1)
        crop_z = z.split(sizes)
        crop_scores = list(self.prototype_scores(z).split(sizes))
        queued_scores = None
        if self.queue.full:
            with torch.no_grad():
                queued_scores = [self.prototype_scores(q) for q in self.queue.embeddings]
        loss = self.criterion(crop_scores, queued_scores)
        if self.training and self.queue_active:
            assign = [crop_z[i].detach() for i in range(self.num_assignment_crops)]
            self._pending = [distributed.gather_no_grad(a) for a in assign]
        with torch.no_grad():  # share of prototypes nearest to some sample: falls towards 1/K as the batch collapses
            prototypes_used = crop_scores[0].argmax(dim=1).unique().numel() / self.num_prototypes
        return {
            "loss": loss,
            "embedding": crop_z[0].detach(),
            "prototypes_used": torch.tensor(prototypes_used),
            "queue_in_use": torch.tensor(float(queued_scores is not None)),
        }

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        if self._pending is not None:
            self.queue.push(self._pending)
            self._pending = None
