"""MAE (He et al. 2022): the masked-patch reconstruction loss against a loop-based reference (normalised pixels
with the unbiased patch variance), the per-sample random masking, which parts receive gradients, the method's
registration, and 20 steps of its own recipe on real CIFAR-10 images."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models import build_backbone
from ssl_models.methods.mae import MAE, MaskedPatchReconstructionLoss, random_masking
from support.method_checks import (
    check_float32_under_autocast,
    check_own_recipe_lowers_the_loss_without_collapse,
    check_registered_with_family_and_recipe,
)
from support.reference import ATOL, randn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_equals_reference(norm_pix):
    pred, patches = randn(2, 5, 12, seed=13), randn(2, 5, 12, seed=14)
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
    patches = randn(2, 4, 12, seed=15)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.float64)
    # a perfect reconstruction of the normalised pixels costs nothing
    assert float(loss(loss.target(patches), patches, mask)) == pytest.approx(0.0, abs=ATOL)
    # constant patches normalise to 0: the loss is the mean square of the prediction
    pred = randn(2, 4, 12, seed=16)
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


def test_mae_loss_runs_in_float32_under_autocast():
    check_float32_under_autocast(
        MaskedPatchReconstructionLoss(), [(2, 4, 12), (2, 4, 12)], extra=(torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]]),)
    )


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_and_recipe():
    check_registered_with_family_and_recipe("mae", "masked_image_modeling")


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


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_lower_the_loss_without_collapse(cifar_tensors):
    check_own_recipe_lowers_the_loss_without_collapse("mae", cifar_tensors)
