"""SwAV (Caron et al. 2020): Sinkhorn-Knopp codes (appendix A.1) and the swapped-prediction loss against
loop-based references, codes without gradient, the prototypes (normalised, frozen first) and the queue, the
method's registration and paper defaults, and 20 steps on real CIFAR-10 images. Under 2 gloo processes:
tests/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models.methods.swav import SwAVLoss, sinkhorn_knopp
from support.method_checks import (
    check_forward_with_paper_defaults_and_grey_28px_inputs,
    check_registered_with_paper_defaults,
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse,
    fake_views,
    make,
)
from support.reference import ATOL, randn, rows, softmax

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ref_sinkhorn(scores: list[list[float]], eps: float, iterations: int) -> list[list[float]]:
    """SwAV appendix A.1 written out: Q = exp(S/eps), total mass 1, then alternately every prototype 1/K and
    every sample 1/B; finally each sample's code sums to 1."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(s / eps) for s in row] for row in scores]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            col = sum(q[i][j] for i in range(b))
            for i in range(b):
                q[i][j] /= col * k
        for i in range(b):
            row = sum(q[i])
            q[i] = [x / (row * b) for x in q[i]]
    return [[x * b for x in row] for row in q]


def ref_swav(scores: list[list[list[float]]], tau: float, eps: float, iterations: int, n_assign: int) -> float:
    loss = 0.0
    for s in range(n_assign):
        codes = ref_sinkhorn(scores[s], eps, iterations)
        sub = 0.0
        for t in range(len(scores)):
            if t == s:
                continue
            ce = 0.0
            for q_row, x_row in zip(codes, scores[t]):
                p = softmax([x / tau for x in x_row])
                ce += -sum(qk * math.log(pk) for qk, pk in zip(q_row, p))
            sub += ce / len(codes)
        loss += sub / (len(scores) - 1)
    return loss / n_assign


# ------------------------------------------------------------------------------------------------ loss
def test_sinkhorn_matches_reference_and_balances_the_prototypes():
    scores = F.normalize(randn(6, 4, seed=80), dim=1) @ F.normalize(randn(4, 4, seed=81), dim=1).T
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    expected = ref_sinkhorn(rows(scores), 0.05, 3)
    for got, want in zip(codes.tolist(), expected):
        assert got == pytest.approx(want, abs=ATOL)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(6, dtype=torch.float64))  # each sample: a distribution
    # many iterations: every prototype gets B/K of the mass (equipartition)
    balanced = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((4,), 6 / 4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_sinkhorn_shared_rows_act_as_extra_samples():
    scores, queue = randn(5, 3, seed=82) * 0.3, randn(7, 3, seed=83) * 0.3
    with_queue = sinkhorn_knopp(scores, epsilon=0.05, iterations=3, shared_scores=queue)
    together = sinkhorn_knopp(torch.cat([queue, scores]), epsilon=0.05, iterations=3)[7:]
    torch.testing.assert_close(with_queue, together)


def test_swav_loss_matches_reference():
    crops = [randn(5, 4, seed=84 + v) * 0.5 for v in range(4)]  # 2 assignment crops + 2 local crops
    loss = SwAVLoss(temperature=0.1, sinkhorn_epsilon=0.05, sinkhorn_iterations=3)(crops)
    expected = ref_swav([rows(c) for c in crops], 0.1, 0.05, 3, n_assign=2)
    assert loss.item() == pytest.approx(expected, abs=ATOL)


def test_swav_loss_limit_cases_and_codes_get_no_gradient():
    k = 6
    # every sample scores every prototype the same (collapse): uniform codes and predictions, L = ln K
    const = [torch.full((4, k), 0.3, dtype=torch.float64) for _ in range(3)]
    assert float(SwAVLoss()(const)) == pytest.approx(math.log(k), abs=ATOL)
    crops = [(randn(6, k, seed=90 + v) * 0.5).requires_grad_() for v in range(3)]
    perm = torch.tensor([2, 5, 0, 1, 4, 3])
    loss = SwAVLoss()(crops)
    assert SwAVLoss()([c[perm] for c in crops]).item() == pytest.approx(loss.item(), abs=ATOL)
    # the gradient flows only through the predictions p_t, never through the codes: check against that recipe
    codes = [sinkhorn_knopp(c, epsilon=0.05, iterations=3) for c in crops[:2]]
    manual = 0.0
    for s, q in enumerate(codes):
        manual = (
            manual + sum(-(q * torch.log_softmax(crops[t] / 0.1, dim=1)).sum(1).mean() for t in range(3) if t != s) / 2
        )
    manual = manual / 2
    g_loss = torch.autograd.grad(loss, crops)
    g_manual = torch.autograd.grad(manual, crops)
    for a, b in zip(g_loss, g_manual):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_recipe_and_paper_defaults():
    check_registered_with_paper_defaults(
        "swav",
        "canonical_correlation_analysis",
        {"temperature": 0.1, "sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3},
    )


def test_forward_with_paper_defaults_and_grey_28px_inputs():
    check_forward_with_paper_defaults_and_grey_28px_inputs("swav")


def test_swav_prototypes_normalised_frozen_first_and_queue_used_once_full():
    torch.manual_seed(0)
    method = make("swav", queue_length=8, queue_start_frac=0.0, freeze_prototypes_frac=0.2)
    views = fake_views(method, batch=4)
    total = 10
    method.on_train_start(total)
    weight = method.prototypes.layer.weight
    in_use = []
    for step in range(4):
        method.zero_grad()
        with torch.no_grad():
            weight.mul_(3.0)  # an optimiser step would change the norms; before_step renormalises
        method.before_step(step, total)
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(weight.shape[0]))
        out = method(views)
        out["loss"].backward()
        if step < 2:
            assert weight.grad is None  # frozen for the first 20% of the steps: the optimiser skips them
        else:
            assert weight.grad.abs().sum() > 0
        in_use.append(out["queue_in_use"].item())
        method.after_step(step, total)
    assert in_use == [0.0, 0.0, 1.0, 1.0]  # 4 rows per step, queue of 8: full after two steps
    assert method.collapse_loss_level == pytest.approx(math.log(50))


# ------------------------------------------------------------------------------------------------ training
def assert_multicrop(method, batches) -> None:
    assert len(batches[0]) == 4 and batches[0][2].shape[-1] < batches[0][0].shape[-1]  # multi-crop


@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(cifar_tensors):
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse("swav", cifar_tensors, before_training=assert_multicrop)
