"""Collapse monitors (the Cookbook, section 4): cheap numbers that say whether an embedding is collapsing.

* :func:`embedding_std`: mean over dimensions of the per-dimension std of l2-normalised embeddings. About
  1/sqrt(d) for embeddings spread over the sphere, 0 when every sample maps to the same point (SimSiam, Chen & He
  2021, section 4.1).
* :func:`rankme`: RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values; the
  effective rank, from 1 (collapsed to a line) to min(B, d).
* :func:`teacher_entropy`: DINO's teacher output entropy, to be compared with ln K (uniform: collapse by
  flattening) and 0 (one-hot: collapse to one dimension).
* :func:`detect_collapse`: the one collapse rule (thresholds in :class:`MonitorConfig`), which the trainer
  applies at every epoch end; :func:`collapse_report` applies it to one batch of embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def embedding_std(embedding: Tensor) -> float:
    """Mean per-dimension std (over the batch) of the l2-normalised embeddings (B x D)."""
    z = F.normalize(embedding.detach().float().flatten(1), dim=1)
    if z.shape[0] < 2:
        return 0.0
    return float(z.std(dim=0).mean())


@torch.no_grad()
def rankme(embedding: Tensor, eps: float = 1e-7) -> float:
    """RankMe = exp(-sum_k p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, sigma the singular values of Z (B x D)."""
    z = embedding.detach().float().flatten(1)
    if z.shape[0] < 2:
        return 1.0
    sigma = torch.linalg.svdvals(z)
    total = sigma.sum()
    if total <= 0:
        return 1.0
    p = sigma / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def teacher_entropy(teacher_probs: Tensor) -> float:
    """Mean entropy (nats) of the rows of a probability matrix (B x K): ln K when uniform, 0 when one-hot."""
    p = teacher_probs.detach().float()
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean())


def healthy_std(dim: int) -> float:
    """The embedding std of points spread uniformly over the unit sphere in ``dim`` dimensions: 1/sqrt(d)."""
    return 1.0 / math.sqrt(dim)


@dataclass
class MonitorConfig:
    """Collapse thresholds of :func:`detect_collapse`, ``fatal`` (the trainer stops on a collapse) and ``samples``
    (embeddings of the epoch's last batches kept for the std and RankMe). The pipeline builds it from params.yaml's
    ``pretrain.monitor``, whose defaults are these."""

    min_std_ratio: float = 0.05
    min_rankme: float = 1.5
    loss_plateau_tolerance: float = 0.01
    fatal: bool = False
    samples: int = 512


def detect_collapse(
    metrics: Mapping[str, float], monitor: MonitorConfig, *, dim: int, loss_level: float | None = None
) -> list[str]:
    """Reasons the metrics (``emb_std``, ``rankme``, ``loss``) look collapsed (empty when healthy): the std of the
    l2-normalised embeddings below ``min_std_ratio`` x 1/sqrt(d), RankMe below ``min_rankme``, or the loss within
    ``loss_plateau_tolerance`` of the method's uniform-output level (``collapse_loss_level``, DINO: ln K)."""
    reasons = []
    std = metrics.get("emb_std")
    if std is not None and math.isfinite(std) and std * math.sqrt(max(dim, 1)) < monitor.min_std_ratio:
        reasons.append(f"embedding std {std:.3g} < {monitor.min_std_ratio:g}/sqrt({dim})")
    rank = metrics.get("rankme")
    if rank is not None and math.isfinite(rank) and rank < monitor.min_rankme:
        reasons.append(f"RankMe {rank:.3g} < {monitor.min_rankme:g}")
    loss = metrics.get("loss")
    if loss_level and loss is not None and abs(loss - loss_level) <= monitor.loss_plateau_tolerance * loss_level:
        reasons.append(f"loss {loss:.4g} stuck at the uniform-output level {loss_level:.4g} (ln K)")
    return reasons


@torch.no_grad()
def collapse_report(embedding: Tensor, monitor: MonitorConfig | None = None) -> dict[str, float | bool]:
    """emb_std, its ratio to 1/sqrt(d), RankMe, and ``collapsed``: :func:`detect_collapse` on this batch."""
    d = embedding.flatten(1).shape[1]
    std = embedding_std(embedding)
    rank = rankme(embedding)
    reasons = detect_collapse({"emb_std": std, "rankme": rank}, monitor or MonitorConfig(), dim=d)
    return {"emb_std": std, "emb_std_ratio": std / healthy_std(d), "rankme": rank, "collapsed": bool(reasons)}
