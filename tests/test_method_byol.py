"""BYOL (Grill et al. 2020): the normalised-MSE loss against eq. 2 and its stop-gradient, the EMA teacher, the
DirectPred predictor (Tian et al. 2021) set from the running correlation, the method's registration, and 20 steps of
its own recipe on real CIFAR-10 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_models import build_backbone
from ssl_models.heads import cosine_momentum
from ssl_models.methods.byol import BYOL, BYOLLoss, DirectPredictor
from support.method_checks import (
    check_float32_under_autocast,
    check_own_recipe_lowers_the_loss_without_collapse,
    check_registered_with_family_and_recipe,
)
from support.reference import ATOL, norm, randn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def byol_reference(p, z):
    """BYOL eq. 2: || p/||p|| - z/||z|| ||^2, mean over the batch."""
    total = 0.0
    for a, b in zip(p.tolist(), z.tolist()):
        na, nb = norm(a), norm(b)
        total += sum((x / na - y / nb) ** 2 for x, y in zip(a, b))
    return total / len(p)


def direct_pred_reference(corr, eps):
    """DirectPred's W_p = U diag(sqrt(s / max s) + eps) U^T, with numpy's eigendecomposition."""
    s, u = np.linalg.eigh(corr)
    s = np.clip(s, 0, None)
    return (u * (np.sqrt(s / s.max()) + eps)) @ u.T


# ------------------------------------------------------------------------------------------------ loss
def test_byol_loss_equals_reference_and_limits():
    p, z = randn(7, 5, seed=5), randn(7, 5, seed=6)
    loss = BYOLLoss()
    assert float(loss(p, z)) == pytest.approx(byol_reference(p, z), abs=ATOL)
    assert float(loss(p, 3 * p)) == pytest.approx(0.0, abs=ATOL)  # identical directions
    assert float(loss(p, -p)) == pytest.approx(4.0, abs=ATOL)  # opposite directions: 2 - 2(-1)
    const = torch.ones(4, 5, dtype=torch.float64)
    assert float(loss(const, const)) == pytest.approx(0.0, abs=ATOL)  # collapsed: the trivial minimum
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    assert float(loss(p[perm], z[perm])) == pytest.approx(float(loss(p, z)), abs=1e-10)


def test_byol_target_is_a_stop_gradient():
    p = randn(4, 3, seed=7).requires_grad_(True)
    z = randn(4, 3, seed=8).requires_grad_(True)
    BYOLLoss()(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_byol_loss_runs_in_float32_under_autocast():
    check_float32_under_autocast(BYOLLoss(), [(8, 16)] * 2)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_and_recipe():
    check_registered_with_family_and_recipe("byol", "self_distillation")


def test_byol_teacher_gets_no_gradient_predictor_and_projector_do():
    torch.manual_seed(0)
    method = BYOL(
        build_backbone("resnet18", width=8, small_image=True),
        projection_dim=16,
        projector_hidden_dim=32,
        predictor_hidden_dim=32,
    )
    views = [torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)]
    method(views)["loss"].backward()
    for name, module in method.teacher_modules().items():
        assert all(not p.requires_grad and p.grad is None for p in module.parameters()), name
    for part in (method.predictor, method.projector, method.backbone):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0

    # the EMA step moves the teacher towards the student by (1 - momentum), momentum following the cosine
    student = [p.detach().clone() for p in method.backbone.parameters()]
    teacher = [p.detach().clone() for p in method.target_backbone.parameters()]
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.after_step(0, 10)
    tau = cosine_momentum(0, 10, 0.99)
    assert tau == pytest.approx(0.99)
    for t_old, s_old, t_new in zip(teacher, student, method.target_backbone.parameters()):
        torch.testing.assert_close(t_new, tau * t_old + (1 - tau) * (s_old + 1.0))
    assert cosine_momentum(5, 10, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(10, 10, 0.99) == pytest.approx(1.0)


def test_direct_predictor_is_set_from_the_running_correlation():
    z1, z2 = randn(32, 6, seed=1).float() @ randn(6, 6, seed=2).float(), randn(32, 6, seed=3).float()
    predictor = DirectPredictor(6, eps=0.1, rho=0.3)
    assert torch.equal(predictor.weight, torch.eye(6))
    out = predictor(z1)  # the first batch starts F
    c1 = (z1.T @ z1 / 32).numpy()
    np.testing.assert_allclose(predictor.weight.numpy(), direct_pred_reference(c1, 0.1), atol=1e-5)
    torch.testing.assert_close(out, z1 @ predictor.weight)
    predictor(z2)  # then F <- rho F + (1 - rho) E[z z^T]
    corr = 0.3 * c1 + 0.7 * (z2.T @ z2 / 32).numpy()
    np.testing.assert_allclose(predictor.correlation.numpy(), corr, atol=1e-5)
    w = predictor.weight.numpy()
    np.testing.assert_allclose(w, direct_pred_reference(corr, 0.1), atol=1e-5)
    np.testing.assert_allclose(w @ corr, corr @ w, atol=1e-4)  # eigenspace-aligned with F
    assert int(predictor.updates) == 2

    # eval mode predicts with the last W_p and leaves it alone; gradients reach z, none is kept for W_p
    predictor.eval()
    z = randn(4, 6, seed=4).float().requires_grad_(True)
    predictor(z).sum().backward()
    torch.testing.assert_close(z.grad, predictor.weight.sum(1).expand(4, 6))
    assert int(predictor.updates) == 2 and list(predictor.parameters()) == []
    assert set(predictor.state_dict()) == {"correlation", "weight", "updates"}  # checkpoints carry it

    for bad in (dict(eps=-0.1), dict(rho=1.0)):
        with pytest.raises(ValueError, match="DirectPredictor"):
            DirectPredictor(6, **bad)


def test_byol_with_direct_predictor_trains_backbone_and_projector():
    torch.manual_seed(0)
    method = BYOL(
        build_backbone("resnet18", width=8, small_image=True),
        projection_dim=16,
        projector_hidden_dim=32,
        predictor="direct",
        direct_pred_eps=0.3,
    )
    assert isinstance(method.predictor, DirectPredictor) and method.predictor.eps == 0.3
    views = [torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)]
    out = method(views)
    assert float(out["loss"].detach()) > 0
    out["loss"].backward()
    for part in (method.projector, method.backbone):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0
    assert not torch.equal(method.predictor.weight, torch.eye(16))
    with pytest.raises(ValueError, match="byol: predictor must be one of mlp, direct, got 'linear'"):
        BYOL(build_backbone("resnet18", width=8, small_image=True), predictor="linear")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_lower_the_loss_without_collapse(cifar_tensors):
    check_own_recipe_lowers_the_loss_without_collapse("byol", cifar_tensors)
