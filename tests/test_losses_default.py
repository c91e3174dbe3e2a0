"""The four default losses (SimCLR, BYOL, VICReg, MAE) against direct loop-based implementations of their papers'
equations, their limit cases, and which parts of a method receive gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_models import build_backbone
from ssl_models.heads import cosine_momentum
from ssl_models.methods.byol import BYOL, BYOLLoss, DirectPredictor
from ssl_models.methods.mae import MAE, MaskedPatchReconstructionLoss, random_masking
from ssl_models.methods.simclr import NTXentLoss
from ssl_models.methods.vicreg import VICRegLoss

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fixed(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


# ------------------------------------------------------------------ references written from the equations
def ntxent_reference(z1, z2, tau):
    """SimCLR eq. 1: views interleaved as 2k, 2k+1; l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    views = []
    for a, b in zip(z1.tolist(), z2.tolist()):
        views += [a, b]
    n2 = len(views)
    total = 0.0
    for i in range(n2):
        j = i + 1 if i % 2 == 0 else i - 1
        denominator = sum(math.exp(_cos(views[i], views[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(_cos(views[i], views[j]) / tau) / denominator)
    return total / n2


def byol_reference(p, z):
    """BYOL eq. 2: || p/||p|| - z/||z|| ||^2, mean over the batch."""
    total = 0.0
    for a, b in zip(p.tolist(), z.tolist()):
        na, nb = _norm(a), _norm(b)
        total += sum((x / na - y / nb) ** 2 for x, y in zip(a, b))
    return total / len(p)


def vicreg_reference(z1, z2, lam=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4):
    """VICReg eqs. 1-6 with loops over samples and dimensions; the two variance terms averaged (official code)."""
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])
    invariance = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_cov(z):
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        cov = [[sum((z[k][i] - means[i]) * (z[k][j] - means[j]) for k in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        v = sum(max(0.0, gamma - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        c = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, c

    v1, c1 = var_cov(a)
    v2, c2 = var_cov(b)
    return lam * invariance + mu * (v1 + v2) / 2 + nu * (c1 + c2)


def mae_reference(pred, patches, mask, norm_pix=True):
    """MAE: per-patch MSE against the (per-patch normalised) pixels, averaged over masked patches only."""
    num, den = 0.0, 0.0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            x = patches[b, i].tolist()
            if norm_pix:
                m = sum(x) / len(x)
                var = sum((v - m) ** 2 for v in x) / (len(x) - 1)  # unbiased, as the official code
                x = [(v - m) / math.sqrt(var + 1e-6) for v in x]
            mse = sum((p - t) ** 2 for p, t in zip(pred[b, i].tolist(), x)) / len(x)
            num += float(mask[b, i]) * mse
            den += float(mask[b, i])
    return num / den


# ------------------------------------------------------------------ SimCLR
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_equals_reference(tau):
    z1, z2 = fixed(6, 5, seed=1), fixed(6, 5, seed=2)
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
    z1, z2 = fixed(n, 4, seed=3), fixed(n, 4, seed=4)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert float(loss(z1[perm], z2[perm])) == pytest.approx(float(loss(z1, z2)), abs=1e-10)
    # ... but pairing each view with another image's view does
    assert abs(float(loss(z1, z2.roll(1, 0))) - float(loss(z1, z2))) > 1e-3


# ------------------------------------------------------------------ BYOL
def test_byol_loss_equals_reference_and_limits():
    p, z = fixed(7, 5, seed=5), fixed(7, 5, seed=6)
    loss = BYOLLoss()
    assert float(loss(p, z)) == pytest.approx(byol_reference(p, z), abs=ATOL)
    assert float(loss(p, 3 * p)) == pytest.approx(0.0, abs=ATOL)           # identical directions
    assert float(loss(p, -p)) == pytest.approx(4.0, abs=ATOL)              # opposite directions: 2 - 2(-1)
    const = torch.ones(4, 5, dtype=torch.float64)
    assert float(loss(const, const)) == pytest.approx(0.0, abs=ATOL)       # collapsed: the trivial minimum
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    assert float(loss(p[perm], z[perm])) == pytest.approx(float(loss(p, z)), abs=1e-10)


def test_byol_target_is_a_stop_gradient():
    p = fixed(4, 3, seed=7).requires_grad_(True)
    z = fixed(4, 3, seed=8).requires_grad_(True)
    BYOLLoss()(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# ------------------------------------------------------------------ VICReg
def test_vicreg_equals_reference():
    z1, z2 = fixed(6, 4, seed=9), fixed(6, 4, seed=10) * 0.7
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
    z1, z2 = fixed(6, 4, seed=11), fixed(6, 4, seed=12)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    assert float(loss(z1[perm], z2[perm])) == pytest.approx(float(loss(z1, z2)), abs=1e-10)


def test_vicreg_variance_term_averages_the_two_views_closed_form():
    """n = 2, d = 2: dimension 0 is +-a (unbiased variance 2a^2), dimension 1 constant (variance 0), so the
    covariance term is 0 and every term has a closed form; the views differ by a factor of 3."""
    a, eps = 0.5, 1e-4
    z1 = torch.tensor([[a, 0.0], [-a, 0.0]], dtype=torch.float64)
    z2 = 3 * z1
    v1 = ((1 - math.sqrt(2 * a * a + eps)) + (1 - math.sqrt(eps))) / 2       # std 0.707 < 1: both dims hinge
    v2 = (0.0 + (1 - math.sqrt(eps))) / 2                                    # std 2.12 > 1: only the constant dim
    invariance = (2 * a) ** 2 * 2 / 4                                        # (z1 - z2)^2 = (2a)^2 on 2 of 4 cells
    terms = VICRegLoss().terms(z1, z2)
    assert float(terms["variance"]) == pytest.approx((v1 + v2) / 2, abs=1e-12)
    assert float(terms["covariance"]) == pytest.approx(0.0, abs=1e-12)
    assert float(VICRegLoss()(z1, z2)) == pytest.approx(25 * invariance + 25 * (v1 + v2) / 2, abs=1e-10)
    # identical views: the average of two equal terms is the term itself (the paper's sum would double it)
    assert float(VICRegLoss()(z1, z1)) == pytest.approx(25 * v1, abs=1e-10)


# ------------------------------------------------------------------ MAE
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_equals_reference(norm_pix):
    pred, patches = fixed(2, 5, 12, seed=13), fixed(2, 5, 12, seed=14)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
    got = float(MaskedPatchReconstructionLoss(norm_pix=norm_pix)(pred, patches, mask))
    assert got == pytest.approx(mae_reference(pred, patches, mask, norm_pix), abs=ATOL)


def test_mae_normalised_target_uses_the_unbiased_patch_variance_closed_form():
    """Patch (0, 1): mean 1/2, unbiased variance 1/2 (biased would be 1/4), so the target is
    +-(1/2) / sqrt(1/2 + 1e-6); a prediction of (-1, 1) misses it by 1 - that in each pixel."""
    loss = MaskedPatchReconstructionLoss()
    patches = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    t = 0.5 / math.sqrt(0.5 + 1e-6)
    assert loss.target(patches)[0, 0].tolist() == pytest.approx([-t, t], abs=1e-12)
    pred = torch.tensor([[[-1.0, 1.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    assert float(loss(pred, patches, mask)) == pytest.approx((1 - t) ** 2, abs=1e-12)
    # four pixels (0, 1, 2, 3): unbiased variance 5/3
    patches = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]], dtype=torch.float64)
    expected = [(v - 1.5) / math.sqrt(5 / 3 + 1e-6) for v in (0, 1, 2, 3)]
    assert loss.target(patches)[0, 0].tolist() == pytest.approx(expected, abs=1e-12)


def test_mae_loss_limit_cases():
    loss = MaskedPatchReconstructionLoss()
    patches = fixed(2, 4, 12, seed=15)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.float64)
    # a perfect reconstruction of the normalised pixels costs nothing
    assert float(loss(loss.target(patches), patches, mask)) == pytest.approx(0.0, abs=ATOL)
    # constant patches normalise to 0: the loss is the mean square of the prediction
    pred = fixed(2, 4, 12, seed=16)
    const = torch.full_like(patches, 0.7)
    expected = float((pred.pow(2).mean(-1) * mask).sum() / mask.sum())
    assert float(loss(pred, const, mask)) == pytest.approx(expected, abs=ATOL)
    # visible patches do not count
    wild = pred.clone()
    wild[mask == 0] = 1e3
    assert float(loss(wild, patches, mask)) == pytest.approx(float(loss(pred, patches, mask)), abs=1e-9)
    perm = torch.tensor([1, 0])
    assert float(loss(pred[perm], patches[perm], mask[perm])) == pytest.approx(float(loss(pred, patches, mask)))


def test_random_masking_is_a_per_sample_permutation():
    torch.manual_seed(0)
    keep, restore, mask = random_masking(5, 16, 0.75)
    assert keep.shape == (5, 4) and mask.shape == (5, 16)
    assert torch.equal(mask.sum(1), torch.full((5,), 12.0))
    for b in range(5):  # the kept patches are exactly the unmasked ones
        assert sorted(keep[b].tolist()) == sorted(torch.nonzero(mask[b] == 0).flatten().tolist())
    assert len({tuple(k.tolist()) for k in keep}) > 1


# ------------------------------------------------------------------ gradients through whole methods
def test_byol_teacher_gets_no_gradient_predictor_and_projector_do():
    torch.manual_seed(0)
    method = BYOL(build_backbone("resnet18", width=8, small_image=True), projection_dim=16,
                  projector_hidden_dim=32, predictor_hidden_dim=32)
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


def direct_pred_reference(corr, eps):
    """DirectPred's W_p = U diag(sqrt(s / max s) + eps) U^T, with numpy's eigendecomposition."""
    s, u = np.linalg.eigh(corr)
    s = np.clip(s, 0, None)
    return (u * (np.sqrt(s / s.max()) + eps)) @ u.T


def test_direct_predictor_is_set_from_the_running_correlation():
    z1, z2 = fixed(32, 6, seed=1).float() @ fixed(6, 6, seed=2).float(), fixed(32, 6, seed=3).float()
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
    z = fixed(4, 6, seed=4).float().requires_grad_(True)
    predictor(z).sum().backward()
    torch.testing.assert_close(z.grad, predictor.weight.sum(1).expand(4, 6))
    assert int(predictor.updates) == 2 and list(predictor.parameters()) == []
    assert set(predictor.state_dict()) == {"correlation", "weight", "updates"}  # checkpoints carry it

    for bad in (dict(eps=-0.1), dict(rho=1.0)):
        with pytest.raises(ValueError, match="DirectPredictor"):
            DirectPredictor(6, **bad)


def test_byol_with_direct_predictor_trains_backbone_and_projector():
    torch.manual_seed(0)
    method = BYOL(build_backbone("resnet18", width=8, small_image=True), projection_dim=16,
                  projector_hidden_dim=32, predictor="direct", direct_pred_eps=0.3)
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


def test_mae_gradients_reach_encoder_and_decoder_and_only_masked_patches_count():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    method = MAE(vit, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    out = method([torch.randn(3, 3, 16, 16)])
    out["loss"].backward()
    assert float(out["mask_ratio"]) == pytest.approx(0.75)
    for part in (method.backbone.patch_embed, method.backbone.blocks, method.decoder_blocks, method.decoder_pred):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0
    assert float(method.mask_token.grad.abs().sum()) > 0


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("loss,shapes", [(NTXentLoss(0.1), [(8, 16)] * 2), (BYOLLoss(), [(8, 16)] * 2),
                                         (VICRegLoss(), [(8, 16)] * 2),
                                         (MaskedPatchReconstructionLoss(), [(2, 4, 12), (2, 4, 12)])])
def test_losses_run_in_float32_under_autocast(loss, shapes):
    inputs = [fixed(*s, seed=20 + i).float() for i, s in enumerate(shapes)]
    if isinstance(loss, MaskedPatchReconstructionLoss):
        inputs.append(torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]]))
    reference = loss(*inputs)
    half = [x.bfloat16() for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(*half)
        outside = inputs[0].flatten(1) @ inputs[0].flatten(1).T
    assert outside.dtype == torch.bfloat16  # autocast is on around the loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss(*[x.float() for x in half]))  # upcast, then exact float32 maths
    torch.testing.assert_close(got, reference, atol=0.05, rtol=0.02)
