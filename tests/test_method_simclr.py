"""SimCLR (Chen et al. 2020): the NT-Xent loss against a loop-based reference of eq. 1 and its limit cases, the
method's registration, and 20 steps of its own recipe on real CIFAR-10 images."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models.methods.simclr import NTXentLoss
from support.method_checks import (
    check_float32_under_autocast,
    check_own_recipe_lowers_the_loss_without_collapse,
    check_registered_with_family_and_recipe,
)
from support.reference import ATOL, cos, randn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ntxent_reference(z1, z2, tau):
    """SimCLR eq. 1: views interleaved as 2k, 2k+1; l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    views = []
    for a, b in zip(z1.tolist(), z2.tolist()):
        views += [a, b]
    n2 = len(views)
    total = 0.0
    for i in range(n2):
        j = i + 1 if i % 2 == 0 else i - 1
        denominator = sum(math.exp(cos(views[i], views[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(cos(views[i], views[j]) / tau) / denominator)
    return total / n2


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_equals_reference(tau):
    z1, z2 = randn(6, 5, seed=1), randn(6, 5, seed=2)
    assert float(NTXentLoss(tau)(z1, z2)) == pytest.approx(ntxent_reference(z1, z2, tau), abs=ATOL)


def test_ntxent_limit_cases():
    tau, n = 0.2, 5
    loss = NTXentLoss(tau)
    # constant embeddings: every similarity is 1, so l = log(2N - 1)
    const = torch.ones(n, 3, dtype=torch.float64)
    assert float(loss(const, 2 * const)) == pytest.approx(math.log(2 * n - 1), abs=ATOL)
    # identical views of orthogonal images: positive similarity 1, every negative 0
    eye = torch.eye(n, dtype=torch.float64)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * n - 2))
    assert float(loss(eye, eye)) == pytest.approx(expected, abs=ATOL)
    # permuting the batch (both views alike) does not change the loss
    z1, z2 = randn(n, 4, seed=3), randn(n, 4, seed=4)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert float(loss(z1[perm], z2[perm])) == pytest.approx(float(loss(z1, z2)), abs=1e-10)
    # ... but pairing each view with another image's view does
    assert abs(float(loss(z1, z2.roll(1, 0))) - float(loss(z1, z2))) > 1e-3


def test_ntxent_runs_in_float32_under_autocast():
    check_float32_under_autocast(NTXentLoss(0.1), [(8, 16)] * 2)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_and_recipe():
    check_registered_with_family_and_recipe("simclr", "deep_metric_learning")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_lower_the_loss_without_collapse(cifar_tensors):
    check_own_recipe_lowers_the_loss_without_collapse("simclr", cifar_tensors)
