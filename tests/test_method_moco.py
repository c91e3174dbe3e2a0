"""MoCo v3 (Chen, Xie and He 2021): the symmetric InfoNCE loss against a loop-based reference and its limit cases,
the momentum encoder (no gradient, follows the EMA), the method's registration and paper defaults, and 20 steps on
real CIFAR-10 images. Its loss over 2 gloo processes: tests/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models.methods.moco import MoCoV3Loss
from support.method_checks import (
    check_forward_with_paper_defaults_and_grey_28px_inputs,
    check_registered_with_paper_defaults,
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse,
    fake_views,
    has_gradient,
    make,
)
from support.reference import ATOL, randn, ref_infonce, rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ref_moco(q: list, k: list, tau: float) -> float:
    return 2 * tau * ref_infonce(q, k, tau)


# ------------------------------------------------------------------------------------------------ loss
def test_moco_loss_matches_reference_and_keys_get_no_gradient():
    q, k = randn(6, 5, seed=1).requires_grad_(), randn(6, 5, seed=2).requires_grad_()
    loss = MoCoV3Loss(temperature=0.2)(q, k)
    assert loss.item() == pytest.approx(ref_moco(rows(q), rows(k), 0.2), abs=ATOL)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None  # keys come from the momentum encoder: a constant for the loss


def test_moco_loss_limit_cases():
    tau = 0.2
    # constant embeddings: every key looks the same, each term is log N: 2 tau log N
    const = torch.ones(5, 4, dtype=torch.float64)
    assert float(MoCoV3Loss(tau)(const, const)) == pytest.approx(2 * tau * math.log(5), abs=ATOL)
    # identical views with orthogonal rows: 2 tau log(1 + (N-1) exp(-1/tau))
    eye = torch.eye(4, dtype=torch.float64)
    assert float(MoCoV3Loss(tau)(eye, eye)) == pytest.approx(2 * tau * math.log(1 + 3 * math.exp(-1 / tau)), abs=ATOL)
    # batch permutation
    q, k = randn(7, 5, seed=3), randn(7, 5, seed=4)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert float(MoCoV3Loss(tau)(q[perm], k[perm])) == pytest.approx(float(MoCoV3Loss(tau)(q, k)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_recipe_and_paper_defaults():
    check_registered_with_paper_defaults(
        "moco", "deep_metric_learning", {"temperature": 0.2, "base_momentum": 0.99, "final_momentum": 1.0}
    )


def test_forward_with_paper_defaults_and_grey_28px_inputs():
    check_forward_with_paper_defaults_and_grey_28px_inputs("moco")


def test_moco_momentum_encoder_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    method = make("moco")
    method.on_train_start(10)
    method(fake_views(method, batch=6))["loss"].backward()
    for part in (method.backbone, method.projector, method.predictor):
        assert has_gradient(part)
    for teacher in method.teacher_modules().values():
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    before = [p.clone() for p in method.momentum_projector.parameters()]
    with torch.no_grad():
        for p in method.projector.parameters():
            p.add_(1.0)
    method.after_step(0, 10)  # momentum at step 0 is the base, 0.99
    for b, t, s in zip(before, method.momentum_projector.parameters(), method.projector.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(cifar_tensors):
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse("moco", cifar_tensors)
