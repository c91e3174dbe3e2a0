"""Collapse monitors (the Cookbook, section 4): cheap numbers that say whether an embedding is collapsing.

* :func:`embedding_std`: mean over dimensions of the per-dimension std of l2-normalised embeddings. About
  1/sqrt(d) for embeddings spread over the sphere, 0 when every sample maps to the same point (SimSiam, Chen & He
  2021, section 4.1).
* :func:`rankme`: RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values; the
  effective rank, from 1 (collapsed to a line) to min(B, d).
* :func:`teacher_entropy`: DINO's teacher output entropy, to be compared with ln K (uniform: collapse by
  flattening) and 0 (one-hot: collapse to one dimension).
* :func:`collapse_report`: the three-in-one summary the trainer logs and the tests assert on.
"""
from __future__ import annotations

import math

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


@torch.no_grad()
def collapse_report(embedding: Tensor, *, min_std_ratio: float = 0.1) -> dict[str, float | bool]:
    """emb_std, its ratio to 1/sqrt(d), RankMe, and ``collapsed`` (ratio below ``min_std_ratio`` or RankMe < 1.5)."""
    d = embedding.flatten(1).shape[1]
    std = embedding_std(embedding)
    ratio = std / healthy_std(d)
    rank = rankme(embedding)
    return {"emb_std": std, "emb_std_ratio": ratio, "rankme": rank,
            "collapsed": bool(ratio < min_std_ratio or rank < 1.5)}
