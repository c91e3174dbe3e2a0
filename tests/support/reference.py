"""Plain-Python building blocks for the loss references in the method tests: each reference transcribes its
paper's equation with loops over samples and dimensions (floats and ``math``, no tensor algebra), evaluated on fixed
small float64 tensors; the library's vectorised losses must agree to ``ATOL``."""

from __future__ import annotations

import math

import torch

ATOL = 1e-5


def randn(*shape: int, seed: int) -> torch.Tensor:
    """A fixed float64 normal tensor: the same numbers on every run and machine."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().tolist()


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def unit(v: list[float]) -> list[float]:
    n = norm(v)
    return [x / n for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def cos(a: list[float], b: list[float]) -> float:
    return dot(a, b) / (norm(a) * norm(b))


def softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def ref_infonce(anchors: list[list[float]], candidates: list[list[float]], tau: float) -> float:
    """InfoNCE (MoCo v3, NNCLR): 1/N sum_i -log(exp(a_i.c_i/tau) / sum_j exp(a_i.c_j/tau)), a and c l2-normalised."""
    a = [unit(v) for v in anchors]
    c = [unit(v) for v in candidates]
    total = 0.0
    for i in range(len(a)):
        denominator = sum(math.exp(dot(a[i], c[j]) / tau) for j in range(len(c)))
        total += -math.log(math.exp(dot(a[i], c[i]) / tau) / denominator)
    return total / len(a)
