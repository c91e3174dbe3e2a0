"""NNCLR (Dwibedi et al. 2021): the support set (a FIFO, nearest neighbour by cosine similarity) and the InfoNCE
loss against loop-based references, the support set filling after each step, the method's registration and paper
defaults, and 20 steps on real CIFAR-10 images. Under 2 gloo processes: tests/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models.methods.nnclr import NNCLRLoss, SupportSet
from support.method_checks import (
    check_forward_with_paper_defaults_and_grey_28px_inputs,
    check_registered_with_paper_defaults,
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse,
    fake_views,
    has_gradient,
    make,
)
from support.reference import ATOL, dot, randn, ref_infonce, rows, unit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ loss
def test_nnclr_loss_and_support_set_match_reference():
    support = SupportSet(size=8, dim=5).double()
    bank = randn(8, 5, seed=5)
    support.push(bank)
    z, p = randn(6, 5, seed=6), randn(6, 5, seed=7).requires_grad_()
    anchors = support.nearest(z)
    # nearest neighbour by cosine similarity, by hand
    bank_rows = [unit(v) for v in rows(bank)]
    for i, zi in enumerate(rows(z)):
        sims = [dot(unit(zi), b) for b in bank_rows]
        best = max(range(len(sims)), key=sims.__getitem__)
        assert anchors[i].tolist() == pytest.approx(bank_rows[best], abs=1e-12)
    assert not anchors.requires_grad
    loss = NNCLRLoss(temperature=0.1)(anchors, p)
    assert loss.item() == pytest.approx(ref_infonce(rows(anchors), rows(p), 0.1), abs=ATOL)
    loss.backward()
    assert p.grad.abs().sum() > 0


def test_nnclr_support_set_is_a_fifo_and_starts_empty():
    support = SupportSet(size=5, dim=3).double()
    z = randn(2, 3, seed=8)
    torch.testing.assert_close(support.nearest(z), F.normalize(z, dim=1))  # empty: itself
    batches = [randn(2, 3, seed=10 + i) for i in range(4)]
    for b in batches:
        support.push(b)
    assert int(support.filled) == 5
    # 8 rows went in a queue of 5: the last 5 remain, the oldest overwritten first
    kept = F.normalize(torch.cat(batches), dim=1)[-5:]
    assert sorted(map(tuple, support.queue.tolist())) == sorted(map(tuple, kept.tolist()))


def test_nnclr_loss_limit_cases():
    const = torch.ones(5, 4, dtype=torch.float64)
    assert float(NNCLRLoss(0.1)(const, const)) == pytest.approx(math.log(5), abs=ATOL)
    a, p = randn(6, 4, seed=9), randn(6, 4, seed=10)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert float(NNCLRLoss(0.1)(a[perm], p[perm])) == pytest.approx(float(NNCLRLoss(0.1)(a, p)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_recipe_and_paper_defaults():
    check_registered_with_paper_defaults("nnclr", "deep_metric_learning", {"temperature": 0.1})


def test_forward_with_paper_defaults_and_grey_28px_inputs():
    check_forward_with_paper_defaults_and_grey_28px_inputs("nnclr")


def test_nnclr_support_set_fills_after_each_step_with_view_one():
    torch.manual_seed(0)
    method = make("nnclr", support_set_size=10)
    views = fake_views(method, batch=6)
    out = method(views)
    out["loss"].backward()
    assert has_gradient(method.predictor) and has_gradient(method.projector)
    assert int(method.support_set.filled) == 0  # nothing enters before the optimiser step
    method.after_step(0, 10)
    assert int(method.support_set.filled) == 6
    torch.testing.assert_close(method.support_set.queue[:6], F.normalize(out["embedding"], dim=1))
    method.eval()
    method(views)
    method.after_step(1, 10)  # evaluation forwards do not feed the support set
    assert int(method.support_set.filled) == 6


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(cifar_tensors):
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse("nnclr", cifar_tensors)
