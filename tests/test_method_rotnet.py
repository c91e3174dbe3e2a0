"""RotNet: the rotation labels are the rotations applied, the loss is cross entropy, 20 steps on real digits
lower it, and export keeps the backbone only (loadable in torchvision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_models import build_backbone, registry
from ssl_models.methods.rotnet import RotationLoss, RotNet, rotate_all
from support.origins_utils import digits, export_loads_in_torchvision, numpy_cross_entropy, twenty_steps_lower_the_loss
from support.tiny_ssl import write_tiny_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_spatial_context_of_the_origins():
    spec = registry.get("rotnet")
    assert spec.family == "origins" and spec.cls.category == "spatial_context"


def test_each_image_appears_under_all_four_rotations_with_the_label_it_was_given():
    images = torch.randn(3, 2, 5, 5)
    rotated, labels = rotate_all(images)
    assert rotated.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for i in range(12):
        k, b = int(labels[i]), i % 3
        expected = np.rot90(images[b].numpy(), k, axes=(1, 2))  # numpy: k quarter turns counter-clockwise
        np.testing.assert_array_equal(rotated[i].numpy(), expected)


def test_loss_is_the_cross_entropy_over_the_four_rotations():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g)
    assert float(RotationLoss()(logits, labels)) == pytest.approx(
        numpy_cross_entropy(logits.numpy(), labels.numpy()), abs=1e-6
    )


def test_twenty_steps_lower_the_loss_on_digits():
    images, _ = digits(256)
    torch.manual_seed(0)
    method = RotNet(build_backbone("resnet18", in_chans=1, small_image=True, width=8, stem_stride=2), hidden_dim=64)
    before, after = twenty_steps_lower_the_loss(method, images, batch=16)
    assert after < before - 0.05, (before, after)


def test_export_keeps_the_backbone_only_and_it_loads_in_torchvision(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=16, test=16)
    state = export_loads_in_torchvision("rotnet", tmp_path, shards)
    assert any(k.startswith("classifier.") for k in state)  # the pretext head was trained, then left out
