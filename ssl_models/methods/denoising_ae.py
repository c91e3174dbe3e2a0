"""Denoising autoencoder (Vincent, Larochelle, Bengio & Manzagol 2008, "Extracting and Composing Robust
Features with Denoising Autoencoders", ICML): information restoration; the clean image is reconstructed from a
stochastically corrupted copy, so the code must capture the image's structure rather than copy pixels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backbones import feature_map
from ..heads import ConvDecoder
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod

NOISE_KINDS = ("masking", "gaussian")


def corrupt(x: Tensor, *, kind: str, level: float) -> Tensor:
    """The corruption q_D(x~ | x) (paper, sec. 2.3).

    ``masking``: a fraction ``level`` of the inputs, chosen at random, is forced to 0 (the paper's masking
    noise; here 0 is the dataset mean after normalisation, and a pixel's channels are dropped together).
    ``gaussian``: x~ = x + N(0, level^2) (additive isotropic Gaussian noise, the paper's alternative).
    """
    if kind == "masking":
        keep = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) >= level).to(x.dtype)
        return x * keep
    if kind == "gaussian":
        return x + level * torch.randn_like(x)
    raise ValueError(f"denoising_ae: noise must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")


class ReconstructionLoss(nn.Module):
    """L_H(x, z) with z = g(f(x~)): the squared error to the CLEAN input, averaged over pixels and channels
    (the paper's squared-error loss for real-valued inputs; cross entropy is for inputs in [0, 1])."""

    @float32_loss
    def forward(self, reconstruction: Tensor, clean: Tensor) -> Tensor:
        return (reconstruction - clean).pow(2).mean()


@register("denoising_ae", family="origins", category="information_restoration")
class DenoisingAutoencoder(SSLMethod):
    """Encoder f = the backbone (its feature map), decoder g = :class:`ConvDecoder` (dropped at export).

    Defaults: masking noise at 25% (the paper reports 10-50%; 25% is its commonly best MNIST level), Adam-style
    optimiser (the paper trained by SGD layer-wise; one deep encoder is trained end-to-end here).
    """

    augment = "mim"
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "base_lr": 1e-3,
        "weight_decay": 0.0,
        "lr_scaling": "linear",
        "warmup_epochs": 0,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self, backbone: nn.Module, *, noise: str = "masking", noise_level: float = 0.25, decoder_dim: int = 64
    ) -> None:
        super().__init__()
        if noise not in NOISE_KINDS:
            raise ValueError(f"denoising_ae: noise must be one of {', '.join(NOISE_KINDS)}, got {noise!r}")
        if noise_level <= 0 or (noise == "masking" and noise_level >= 1):
            raise ValueError(f"denoising_ae: noise_level must be > 0 (and < 1 for masking), got {noise_level}")
        self.backbone = backbone
        self.noise, self.noise_level = noise, noise_level
        self.decoder = ConvDecoder(backbone.feature_dim, backbone.config.get("in_chans", 3), hidden=decoder_dim)
        self.criterion = ReconstructionLoss()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        clean = views[0]
        fmap = feature_map(self.backbone, corrupt(clean, kind=self.noise, level=self.noise_level))
        loss = self.criterion(self.decoder(fmap, tuple(clean.shape[-2:])), clean)
        return {"loss": loss, "embedding": fmap.mean(dim=(2, 3)).detach()}
