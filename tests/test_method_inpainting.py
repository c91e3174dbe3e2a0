"""Context encoder: the removed region is where the mask says (centre square, the paper's several random
blocks), the overlap ring around it weighs 10x, the loss is the weighted L2 on that region only (loop reference;
pixels outside it get no gradient), 20 steps on digits lower it, export keeps the backbone only."""

from __future__ import annotations

import pytest
import torch

from ssl_models import build_backbone, registry
from ssl_models.methods.inpainting import Inpainting, MaskedReconstructionLoss, overlap_weights, region_mask
from support.origins_utils import digits, export_loads_in_torchvision, twenty_steps_lower_the_loss
from support.tiny_ssl import write_tiny_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_information_restoration_of_the_origins():
    spec = registry.get("inpainting")
    assert spec.family == "origins" and spec.cls.category == "information_restoration"


def test_center_and_random_block_masks():
    center = region_mask(2, 28, 28, kind="center", fraction=0.5)
    assert center.shape == (2, 1, 28, 28) and int(center[0].sum()) == 14 * 14
    assert center[0, 0, 7:21, 7:21].eq(1).all() and center[0, 0, :7].eq(0).all()
    torch.manual_seed(0)
    blocks = region_mask(8, 28, 28, kind="random_block", fraction=0.25)
    assert all(int(b.sum()) == 49 for b in blocks)
    assert len({tuple(b.flatten().nonzero()[0].tolist()) for b in blocks}) > 1  # not all at one place
    with pytest.raises(ValueError, match="mask"):
        region_mask(1, 8, 8, kind="ring", fraction=0.5)


def test_random_blocks_are_smaller_squares_covering_the_centre_squares_area():
    torch.manual_seed(0)
    masks = region_mask(16, 28, 28, kind="random_block", fraction=0.5, block_fraction=0.25)
    for m in masks[:, 0]:
        assert 196 <= int(m.sum()) < 196 + 49  # blocks are added until they cover 14 x 14, not one more
        # every removed pixel lies in a fully removed 7 x 7 square
        full = torch.nn.functional.avg_pool2d(m[None, None], 7, stride=1)[0, 0] == 1
        covered = torch.zeros_like(m)
        for y, x in full.nonzero().tolist():
            covered[y : y + 7, x : x + 7] = 1
        assert torch.equal(covered, m)
    with pytest.raises(ValueError, match="block_fraction"):
        Inpainting(
            build_backbone("resnet18", in_chans=1, small_image=True, width=4),
            mask="random_block",
            mask_fraction=0.25,
            block_fraction=0.5,
        )


def test_overlap_ring_weighs_overlap_weight_against_a_loop():
    torch.manual_seed(0)
    mask = region_mask(3, 12, 12, kind="random_block", fraction=0.5, block_fraction=0.25)
    w = overlap_weights(mask, 2, 10.0)
    for b in range(3):
        removed = mask[b, 0].nonzero().tolist()
        for y in range(12):
            for x in range(12):
                if mask[b, 0, y, x]:
                    want = 1.0
                elif any(max(abs(y - ry), abs(x - rx)) <= 2 for ry, rx in removed):
                    want = 10.0
                else:
                    want = 0.0
                assert float(w[b, 0, y, x]) == want, (b, y, x)
    assert torch.equal(overlap_weights(mask, 0, 10.0), mask)


def test_loss_is_weighted_l2_over_the_predicted_region_against_a_loop():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 8, 8, generator=g)
    mask = region_mask(2, 8, 8, kind="center", fraction=0.5)  # rows/cols 2-5
    weights = overlap_weights(mask, 1, 10.0)  # ring: rows/cols 1 and 6
    loss = MaskedReconstructionLoss()(pred, target, weights)
    total, norm = 0.0, 0.0
    for b in range(2):
        for c in range(3):
            for y in range(8):
                for x in range(8):
                    wt = 1.0 if 2 <= y <= 5 and 2 <= x <= 5 else 10.0 if 1 <= y <= 6 and 1 <= x <= 6 else 0.0
                    total += wt * float(pred[b, c, y, x] - target[b, c, y, x]) ** 2
                    norm += wt
    assert float(loss) == pytest.approx(total / norm, rel=1e-6)
    loss.backward()
    assert pred.grad[weights.expand_as(pred) == 0].abs().max() == 0  # context beyond the ring is not a target
    assert pred.grad[:, :, 1, 1].abs().min() > 0  # the ring is


def test_the_encoder_never_sees_the_removed_pixels():
    torch.manual_seed(0)
    method = Inpainting(
        build_backbone("resnet18", in_chans=1, small_image=True, width=4, stem_stride=2), decoder_dim=8
    ).eval()
    x = torch.randn(2, 1, 28, 28)
    y = x.clone()
    y[:, :, 7:21, 7:21] = torch.randn(2, 1, 14, 14)  # change only the removed region: same loss inputs
    with torch.no_grad():
        a, b = method([x]), method([y])
    torch.testing.assert_close(a["embedding"], b["embedding"])


def test_twenty_steps_lower_the_loss_on_digits():
    images, _ = digits(256)
    torch.manual_seed(0)
    method = Inpainting(
        build_backbone("resnet18", in_chans=1, small_image=True, width=8, stem_stride=2), decoder_dim=16
    )
    before, after = twenty_steps_lower_the_loss(method, images)
    assert after < 0.95 * before, (before, after)


def test_export_keeps_the_backbone_only_and_it_loads_in_torchvision(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=16, test=16)
    state = export_loads_in_torchvision("inpainting", tmp_path, shards)
    assert any(k.startswith("decoder.") for k in state)
