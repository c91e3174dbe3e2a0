"""SimMIM (Xie et al. 2022): the masked L1 loss against a loop-based reference, block masking at the ratio, the
mask token and pixel head receiving gradients, the method's registration and paper defaults, and 20 steps on real
CIFAR-10 images."""

from __future__ import annotations

import pytest
import torch

from ssl_models.methods.simmim import MaskedL1Loss, block_mask
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


def ref_masked_l1(prediction: list, patches: list, mask: list) -> float:
    total, count = 0.0, 0
    for b in range(len(mask)):
        for n in range(len(mask[b])):
            if mask[b][n]:
                for y, x in zip(prediction[b][n], patches[b][n]):
                    total += abs(y - x)
                    count += 1
    return total / count


# ------------------------------------------------------------------------------------------------ loss
def test_masked_l1_matches_reference_and_ignores_visible_patches():
    prediction, patches = randn(2, 6, 12, seed=100), randn(2, 6, 12, seed=101)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.float64)
    loss = MaskedL1Loss()(prediction, patches, mask)
    assert loss.item() == pytest.approx(ref_masked_l1(rows(prediction), rows(patches), mask.tolist()), abs=ATOL)
    changed = prediction.clone()
    changed[mask == 0] += 5.0  # visible patches are not part of the task
    assert float(MaskedL1Loss()(changed, patches, mask)) == pytest.approx(loss.item(), abs=ATOL)
    assert float(MaskedL1Loss()(patches, patches, mask)) == 0.0  # perfect reconstruction
    perm = torch.tensor([1, 0])
    assert float(MaskedL1Loss()(prediction[perm], patches[perm], mask[perm])) == pytest.approx(loss.item(), abs=ATOL)


def test_block_mask_masks_whole_blocks_at_the_ratio():
    torch.manual_seed(0)
    mask = block_mask(16, (8, 8), block=2, mask_ratio=0.6).reshape(16, 8, 8)
    # 16 blocks of 2x2 patches, round(0.6 * 16) = 10 masked per sample
    assert mask.sum(dim=(1, 2)).tolist() == [40.0] * 16
    blocks = mask.reshape(16, 4, 2, 4, 2)
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))  # constant within each block
    assert not torch.equal(mask[0], mask[1])  # random per sample
    odd = block_mask(3, (5, 5), block=2, mask_ratio=0.5)  # grid not a multiple of the block: cropped
    assert odd.shape == (3, 25)


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_recipe_and_paper_defaults():
    check_registered_with_paper_defaults("simmim", "masked_image_modeling", {"mask_ratio": 0.6})


def test_forward_with_paper_defaults_and_grey_28px_inputs():
    check_forward_with_paper_defaults_and_grey_28px_inputs("simmim")


def test_simmim_masks_with_the_token_and_trains_encoder_and_head():
    torch.manual_seed(0)
    method = make("simmim")
    out = method(fake_views(method, batch=4))
    out["loss"].backward()
    assert out["mask_ratio"].item() == pytest.approx(10 / 16)  # 16 blocks of 2x2 patches, 10 masked
    assert has_gradient(method.backbone) and has_gradient(method.pixel_head)
    assert method.mask_token.grad.abs().sum() > 0
    assert "mask_token" in method.no_weight_decay()


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(cifar_tensors):
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse("simmim", cifar_tensors)
