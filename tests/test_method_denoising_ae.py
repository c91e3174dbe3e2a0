"""Denoising autoencoder: masking and Gaussian corruption, the loss is the squared error to the CLEAN input
(numpy reference), 20 steps on digits lower it, export keeps the backbone only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_models import build_backbone, registry
from ssl_models.methods.denoising_ae import DenoisingAutoencoder, ReconstructionLoss, corrupt
from support.origins_utils import digits, export_loads_in_torchvision, twenty_steps_lower_the_loss
from support.tiny_ssl import write_tiny_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_information_restoration_of_the_origins():
    spec = registry.get("denoising_ae")
    assert spec.family == "origins" and spec.cls.category == "information_restoration"


def test_masking_noise_zeroes_the_given_fraction_of_pixels_and_gaussian_adds_noise():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 20, 20) + 1.0  # no zero before corruption
    masked = corrupt(x, kind="masking", level=0.25)
    zero = masked == 0
    assert zero.float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(zero.all(dim=1), zero.any(dim=1))  # a pixel's channels are dropped together
    assert torch.equal(masked[~zero], x[~zero])  # the rest is untouched
    noisy = corrupt(x, kind="gaussian", level=0.5)
    assert (noisy - x).std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="noise"):
        corrupt(x, kind="salt", level=0.1)


def test_loss_is_the_squared_error_to_the_clean_input():
    g = torch.Generator().manual_seed(0)
    recon, clean = torch.randn(2, 1, 5, 5, generator=g), torch.randn(2, 1, 5, 5, generator=g)
    assert float(ReconstructionLoss()(recon, clean)) == pytest.approx(
        float(np.mean((recon.numpy().astype(np.float64) - clean.numpy()) ** 2)), rel=1e-6
    )


def test_twenty_steps_lower_the_loss_on_digits():
    images, _ = digits(256)
    torch.manual_seed(0)
    method = DenoisingAutoencoder(
        build_backbone("resnet18", in_chans=1, small_image=True, width=8, stem_stride=2), decoder_dim=16
    )
    before, after = twenty_steps_lower_the_loss(method, images)
    assert after < 0.95 * before, (before, after)


def test_export_keeps_the_backbone_only_and_it_loads_in_torchvision(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=16, test=16)
    state = export_loads_in_torchvision("denoising_ae", tmp_path, shards)
    assert any(k.startswith("decoder.") for k in state)
