"""VICReg (Bardes et al. 2022): the loss against loops over eqs. 1-6, its limit cases and a closed form of the
variance term, the method's registration, and 20 steps of its own recipe on real CIFAR-10 images."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models.methods.vicreg import VICRegLoss
from support.method_checks import (
    check_float32_under_autocast,
    check_own_recipe_lowers_the_loss_without_collapse,
    check_registered_with_family_and_recipe,
)
from support.reference import ATOL, randn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def vicreg_reference(z1, z2, lam=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4):
    """VICReg eqs. 1-6 with loops over samples and dimensions; the two variance terms averaged (official code)."""
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])
    invariance = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_cov(z):
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        cov = [
            [sum((z[k][i] - means[i]) * (z[k][j] - means[j]) for k in range(n)) / (n - 1) for j in range(d)]
            for i in range(d)
        ]
        v = sum(max(0.0, gamma - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        c = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, c

    v1, c1 = var_cov(a)
    v2, c2 = var_cov(b)
    return lam * invariance + mu * (v1 + v2) / 2 + nu * (c1 + c2)


# ------------------------------------------------------------------------------------------------ loss
def test_vicreg_equals_reference():
    z1, z2 = randn(6, 4, seed=9), randn(6, 4, seed=10) * 0.7
    assert float(VICRegLoss()(z1, z2)) == pytest.approx(vicreg_reference(z1, z2), abs=ATOL)
    kw = dict(sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    got = float(VICRegLoss(**kw)(z1, z2))
    assert got == pytest.approx(vicreg_reference(z1, z2, lam=2.0, mu=3.0, nu=0.5), abs=ATOL)


def test_vicreg_limit_cases():
    loss = VICRegLoss()
    # constant embeddings: no invariance or covariance cost, variance hinge 1 - sqrt(eps) in each view (averaged)
    const = torch.full((8, 5), 0.3, dtype=torch.float64)
    assert float(loss(const, const)) == pytest.approx(25 * (1 - math.sqrt(1e-4)), abs=ATOL)
    # identical, decorrelated views with std above gamma: zero loss
    z = torch.tensor([[2.0, 0], [-2, 0], [0, 2], [0, -2]], dtype=torch.float64) * 1.5
    terms = loss.terms(z, z)
    assert float(terms["invariance"]) == 0.0 and float(terms["covariance"]) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(z, z)) == pytest.approx(0.0, abs=ATOL)
    z1, z2 = randn(6, 4, seed=11), randn(6, 4, seed=12)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    assert float(loss(z1[perm], z2[perm])) == pytest.approx(float(loss(z1, z2)), abs=1e-10)


def test_vicreg_variance_term_averages_the_two_views_closed_form():
    """n = 2, d = 2: dimension 0 is +-a (unbiased variance 2a^2), dimension 1 constant (variance 0), so the
    covariance term is 0 and every term has a closed form; the views differ by a factor of 3."""
    a, eps = 0.5, 1e-4
    z1 = torch.tensor([[a, 0.0], [-a, 0.0]], dtype=torch.float64)
    z2 = 3 * z1
    v1 = ((1 - math.sqrt(2 * a * a + eps)) + (1 - math.sqrt(eps))) / 2  # std 0.707 < 1: both dims hinge
    v2 = (0.0 + (1 - math.sqrt(eps))) / 2  # std 2.12 > 1: only the constant dim
    invariance = (2 * a) ** 2 * 2 / 4  # (z1 - z2)^2 = (2a)^2 on 2 of 4 cells
    terms = VICRegLoss().terms(z1, z2)
    assert float(terms["variance"]) == pytest.approx((v1 + v2) / 2, abs=1e-12)
    assert float(terms["covariance"]) == pytest.approx(0.0, abs=1e-12)
    assert float(VICRegLoss()(z1, z2)) == pytest.approx(25 * invariance + 25 * (v1 + v2) / 2, abs=1e-10)
    # identical views: the average of two equal terms is the term itself (the paper's sum would double it)
    assert float(VICRegLoss()(z1, z1)) == pytest.approx(25 * v1, abs=1e-10)


def test_vicreg_loss_runs_in_float32_under_autocast():
    check_float32_under_autocast(VICRegLoss(), [(8, 16)] * 2)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_and_recipe():
    check_registered_with_family_and_recipe("vicreg", "canonical_correlation_analysis")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_lower_the_loss_without_collapse(cifar_tensors):
    check_own_recipe_lowers_the_loss_without_collapse("vicreg", cifar_tensors)
