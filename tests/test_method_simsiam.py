"""SimSiam (Chen and He 2021): the negative-cosine loss against a loop-based reference and its stop-gradient, the
target branch as a stop-gradient inside the method, the method's registration and paper defaults, 20 steps on real
CIFAR-10 images, and the paper's no-predictor ablation heading for collapse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models.methods.simsiam import NegativeCosineLoss
from ssl_models.monitors import embedding_std, rankme
from support.method_checks import (
    N_BATCHES,
    check_forward_with_paper_defaults_and_grey_28px_inputs,
    check_registered_with_paper_defaults,
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse,
    fake_views,
    has_gradient,
    make,
    train,
    view_batches,
)
from support.reference import ATOL, dot, randn, rows, unit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ref_negative_cosine(p: list, z: list) -> float:
    return -sum(dot(unit(a), unit(b)) for a, b in zip(p, z)) / len(p)


# ------------------------------------------------------------------------------------------------ loss
def test_simsiam_loss_matches_reference_and_stops_the_target_gradient():
    p1, p2 = randn(6, 5, seed=11).requires_grad_(), randn(6, 5, seed=12).requires_grad_()
    z1, z2 = randn(6, 5, seed=13).requires_grad_(), randn(6, 5, seed=14).requires_grad_()
    loss = NegativeCosineLoss()(p1, z1, p2, z2)
    expected = 0.5 * ref_negative_cosine(rows(p1), rows(z2)) + 0.5 * ref_negative_cosine(rows(p2), rows(z1))
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    loss.backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None  # stop-gradient on the targets


def test_simsiam_loss_limit_cases():
    z = randn(5, 4, seed=15)
    assert float(NegativeCosineLoss()(z, z, z, z)) == pytest.approx(-1.0, abs=ATOL)  # identical: minimum -1
    const = torch.ones(5, 4, dtype=torch.float64)
    assert float(NegativeCosineLoss()(const, const, const, const)) == pytest.approx(-1.0, abs=ATOL)  # collapse too
    p1, z1, p2, z2 = (randn(6, 4, seed=s) for s in (16, 17, 18, 19))
    perm = torch.tensor([5, 4, 3, 0, 1, 2])
    permuted = NegativeCosineLoss()(p1[perm], z1[perm], p2[perm], z2[perm])
    assert float(permuted) == pytest.approx(float(NegativeCosineLoss()(p1, z1, p2, z2)), abs=ATOL)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_recipe_and_paper_defaults():
    check_registered_with_paper_defaults("simsiam", "self_distillation", {"use_predictor": True})


def test_forward_with_paper_defaults_and_grey_28px_inputs():
    check_forward_with_paper_defaults_and_grey_28px_inputs("simsiam")


def test_simsiam_target_branch_is_a_stop_gradient():
    torch.manual_seed(0)
    method = make("simsiam")
    views = fake_views(method, batch=6)
    captured = {}
    method.projector.register_forward_hook(lambda m, i, o: captured.update(z=o) or o.retain_grad())
    method(views)["loss"].backward()
    assert has_gradient(method.predictor) and has_gradient(method.projector) and has_gradient(method.backbone)
    # the gradient reaching z is exactly the one through the predictor (the target side contributes nothing)
    z = captured["z"].detach().requires_grad_()
    p1, p2 = method.predictor(z).chunk(2)
    z1, z2 = z.chunk(2)
    manual = 0.5 * (-F.cosine_similarity(p1, z2.detach()).mean() - F.cosine_similarity(p2, z1.detach()).mean())
    (expected,) = torch.autograd.grad(manual, z)
    torch.testing.assert_close(captured["z"].grad, expected)


def test_simsiam_without_predictor_still_trains_the_projector():
    torch.manual_seed(0)
    method = make("simsiam", use_predictor=False)
    assert isinstance(method.predictor, torch.nn.Identity)
    method(fake_views(method, batch=6))["loss"].backward()
    assert has_gradient(method.projector)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(cifar_tensors):
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse("simsiam", cifar_tensors)


@pytest.mark.timeout(300)
def test_simsiam_without_predictor_heads_for_collapse(cifar_tensors):
    """The paper's section 4.2 ablation, which the pretrain tests use to exercise collapse detection."""
    images, _ = cifar_tensors
    final_loss, std_ratio, rank = {}, {}, {}
    for use_predictor in (True, False):
        torch.manual_seed(0)
        method = make("simsiam", use_predictor=use_predictor)
        losses, embeddings = train(method, view_batches(images, method.augment))
        final = torch.cat(embeddings[-N_BATCHES:])
        final_loss[use_predictor] = sum(losses[-N_BATCHES:]) / N_BATCHES
        std_ratio[use_predictor] = embedding_std(final) * math.sqrt(final.shape[1])
        rank[use_predictor] = rankme(final)
    # The float trajectory differs between CPUs, so every bound has a margin measured over seeds 0-3 and three CPU
    # kernel settings (ATEN_CPU_CAPABILITY=default + MKL_ENABLE_INSTRUCTIONS=SSE4_2 + ONEDNN_MAX_CPU_ISA=SSE41;
    # =avx2 + AVX2 + AVX2; this Xeon's native AVX-512), 12 runs, with / without the predictor:
    #   final loss   -0.35..-0.11 / -0.82..-0.63   gap >= 0.42      (one CPU gave -0.798, below the old -0.8 bound)
    #   RankMe       40.7..70.7   / 5.2..26.2      ratio <= 0.395
    #   std ratio    0.89..1.00   / 0.57..0.89     gap >= 0.11
    assert final_loss[False] < -0.55 and final_loss[False] < final_loss[True] - 0.3  # towards the trivial -1
    assert rank[False] < 0.6 * rank[True]  # the embedding is losing dimensions
    assert std_ratio[False] < std_ratio[True] - 0.05
