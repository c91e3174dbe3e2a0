"""Barlow Twins (Zbontar et al. 2021): the cross-correlation loss against a loop-based reference and its limit
cases, the projector's gradient and reported terms, the method's registration and paper defaults, and 20 steps on
real CIFAR-10 images. Under 2 gloo processes: tests/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models.methods.barlowtwins import BarlowTwinsLoss
from support.method_checks import (
    check_forward_with_paper_defaults_and_grey_28px_inputs,
    check_registered_with_paper_defaults,
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse,
    fake_views,
    has_gradient,
    make,
)
from support.reference import ATOL, randn, rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ref_barlow(z1: list, z2: list, lam: float, eps: float) -> float:
    n, d = len(z1), len(z1[0])

    def standardise(z):
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            mean = sum(z[b][j] for b in range(n)) / n
            var = sum((z[b][j] - mean) ** 2 for b in range(n)) / n
            for b in range(n):
                out[b][j] = (z[b][j] - mean) / math.sqrt(var + eps)
        return out

    a, b_ = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[b][i] * b_[b][j] for b in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return loss


# ------------------------------------------------------------------------------------------------ loss
def test_barlow_twins_loss_matches_reference():
    z1, z2 = randn(7, 4, seed=70), randn(7, 4, seed=71)
    criterion = BarlowTwinsLoss(lambda_offdiag=0.3)
    assert float(criterion(z1, z2)) == pytest.approx(ref_barlow(rows(z1), rows(z2), 0.3, 1e-5), abs=ATOL)


def test_barlow_twins_loss_limit_cases():
    d = 5
    # constant embeddings: standardised to 0, C = 0, every diagonal term is 1: L = D
    const = torch.full((6, d), 3.0, dtype=torch.float64)
    assert float(BarlowTwinsLoss(0.0051)(const, const)) == pytest.approx(d, abs=ATOL)
    # identical views: C_ii = var / (var + eps), so the invariance term is ~0 and only redundancy remains
    z = randn(8, d, seed=72)
    terms = BarlowTwinsLoss(0.0051).terms(z, z)
    assert float(terms["on_diagonal"]) < 1e-8
    assert float(terms["mean_diagonal_correlation"]) == pytest.approx(1.0, abs=1e-4)
    # decorrelated (whitened) identical views reach the minimum 0
    white = torch.linalg.qr(randn(8, d, seed=73) - randn(8, d, seed=73).mean(0))[0] * math.sqrt(8)
    white = white - white.mean(0)
    assert float(BarlowTwinsLoss(0.0051, eps=0.0)(white, white)) == pytest.approx(0.0, abs=1e-6)
    # batch permutation
    z1, z2 = randn(6, d, seed=74), randn(6, d, seed=75)
    perm = torch.tensor([1, 3, 5, 0, 2, 4])
    assert float(BarlowTwinsLoss()(z1[perm], z2[perm])) == pytest.approx(float(BarlowTwinsLoss()(z1, z2)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_recipe_and_paper_defaults():
    check_registered_with_paper_defaults("barlowtwins", "canonical_correlation_analysis", {"lambda_offdiag": 0.0051})


def test_forward_with_paper_defaults_and_grey_28px_inputs():
    check_forward_with_paper_defaults_and_grey_28px_inputs("barlowtwins")


def test_barlowtwins_projector_gets_gradient_and_reports_its_terms():
    torch.manual_seed(0)
    method = make("barlowtwins")
    out = method(fake_views(method, batch=6))
    out["loss"].backward()
    assert has_gradient(method.projector) and has_gradient(method.backbone)
    expected = out["on_diagonal"] + method.criterion.lambda_offdiag * out["off_diagonal"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(cifar_tensors):
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse("barlowtwins", cifar_tensors)
