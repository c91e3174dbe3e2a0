"""Colorful image colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization", arXiv 1603.08511):
information restoration; from the lightness of an image alone the network predicts its colours, as a
distribution over quantised ab values of the CIE Lab space."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import RGB_MEAN, RGB_STD
from ..backbones import feature_map
from ..heads import ConvDecoder
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod

_D65 = (0.95047, 1.0, 1.08883)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma: the grey the network is shown
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] (B, 3, H, W) -> CIE Lab (D65): L in [0, 100], a and b about [-110, 110]."""
    rgb = rgb.clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_D65, dtype=rgb.dtype, device=rgb.device)[:, None, None]
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """The inverse of :func:`rgb_to_lab` (not clamped: out-of-gamut colours fall outside [0, 1])."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    xyz = xyz * torch.tensor(_D65, dtype=lab.dtype, device=lab.device)[:, None, None]
    m = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=lab.dtype, device=lab.device))
    linear = torch.einsum("ij,bjhw->bihw", m, xyz)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * linear)


@functools.lru_cache(maxsize=4)
def ab_bins(grid: int = 10) -> Tensor:
    """The quantised ab output space (paper, sec. 2.1): centres of a ``grid``-spaced ab grid that are in the sRGB
    gamut at some lightness (checked at L = 1, 2, ..., 99). The paper keeps the Q = 313 bins seen in ImageNet;
    the gamut test needs no dataset pass and gives Q = 225 at grid 10. (Q x 2) float64."""
    values = torch.arange(-110, 111, grid, dtype=torch.float64)
    a, b = torch.meshgrid(values, values, indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    lightness = torch.arange(1, 100, dtype=torch.float64)
    lab = torch.stack(
        [
            lightness[:, None].expand(-1, a.numel()),
            a[None].expand(len(lightness), -1),
            b[None].expand(len(lightness), -1),
        ],
        dim=1,
    )[..., None]  # L x 3 x Q x 1
    rgb = lab_to_rgb(lab)
    in_gamut = ((rgb >= 0) & (rgb <= 1)).all(dim=1)[..., 0].any(dim=0)
    return torch.stack([a[in_gamut], b[in_gamut]], dim=1)


def soft_encode(ab: Tensor, bins: Tensor, *, neighbours: int = 5, sigma: float = 5.0) -> Tensor:
    """Z = H^{-1}(Y) (paper, sec. 2.1): each pixel's ab value -> weights on its ``neighbours`` nearest bins,
    proportional to a Gaussian of the distance (sigma 5), summing to 1. ab (B, 2, H, W) -> (B, Q, H, W)."""
    b, _, h, w = ab.shape
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2).to(bins.dtype)
    dist = torch.cdist(flat, bins)
    near_d, near_i = dist.topk(neighbours, dim=1, largest=False)
    weights = torch.exp(-near_d.pow(2) / (2 * sigma**2))
    weights = weights / weights.sum(dim=1, keepdim=True)
    z = torch.zeros(flat.shape[0], bins.shape[0], dtype=bins.dtype, device=ab.device).scatter_(1, near_i, weights)
    return z.reshape(b, h, w, -1).permute(0, 3, 1, 2)


class ColorizationLoss(nn.Module):
    """The multinomial cross entropy of the paper (eq. 2, class rebalancing v(Z) = 1):

        L(Zhat, Z) = -1/(HW) sum_{h,w} sum_q Z_{h,w,q} log Zhat_{h,w,q}

    averaged over the batch, with Zhat = softmax of the logits over the Q bins and Z the soft-encoded truth.
    """

    @float32_loss
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@torch.no_grad()
def grey_input_backbone(backbone: nn.Module, pixel_mean: Tensor, pixel_std: Tensor) -> nn.Module:
    """A copy of ``backbone`` that reads only the luma of its normalised RGB input: the grey conversion and the
    views' normalisation are folded into its first layer, so on an RGB view it computes what ``backbone``
    computes on that view's grey version (the paper reads its features from the lightness channel).

    With W the first layer's weights, s and m the views' std and mean, w the luma weights, the layer on the grey
    input sum_c W_c * (g - m_c) / s_c, g = sum_k w_k (x_k s_k + m_k), equals sum_k W'_k * x_k + d with
    W'_k = w_k s_k sum_c W_c / s_c and d = sum(w . m) sum(sum_c W_c / s_c) - sum_c (m_c / s_c) sum(W_c) (sums over
    the kernel). A ViT's patch embedding adds d to its bias (exact); a ResNet stem has no bias, so its first
    BatchNorm's running mean takes -d (exact except in the zero-padded one-pixel border)."""
    folded = copy.deepcopy(backbone)
    layer = folded.patch_embed if hasattr(folded, "patch_embed") else folded.conv1
    w = layer.weight.double()
    mean, std = pixel_mean.double().view(1, 3, 1, 1), pixel_std.double().view(1, 3, 1, 1)
    luma = torch.tensor(_LUMA, dtype=torch.float64, device=w.device).view(1, 3, 1, 1)
    grey_response = (w / std).sum(dim=1, keepdim=True)
    d = (luma * mean).sum() * grey_response.sum(dim=(1, 2, 3)) - (w * mean / std).sum(dim=(1, 2, 3))
    layer.weight.copy_(grey_response * luma * std)
    if layer.bias is not None:
        layer.bias.add_(d.to(layer.bias.dtype))
    else:
        folded.bn1.running_mean.sub_(d.to(folded.bn1.running_mean.dtype))
    return folded


@register("colorization", family="origins", category="information_restoration")
class Colorization(SSLMethod):
    """Backbone on the grey image -> feature map -> :class:`ConvDecoder` -> logits over the Q ab bins at a quarter
    of the input resolution (the paper's output size), soft-encoded targets of the ab image brought to that
    resolution (the paper's code subsamples it; here each block's mean); the decoder is dropped at export.

    Classification, as in the paper, rather than regression: an L2 loss on ab averages the plausible colours of
    an object to a grey-brown mean, and the paper shows the classification loss gives the better features. The
    paper's class rebalancing (weights from the empirical colour prior of ImageNet, lambda 0.5) needs a pass
    over the data's colours and is not implemented: every pixel has weight 1 (the paper's "classification"
    variant without rebalancing, which its representation-learning table also reports).

    The input is the view with its colour removed: the luminance, replicated to the backbone's 3 channels and
    normalised like every view. Export (and the online kNN) take :func:`grey_input_backbone`: the same network
    with the grey conversion folded into its first layer, so it takes ordinary RGB inputs and sees only their
    luminance, as in training (the paper evaluates on the lightness channel; fed colour, the trained stem would
    pass the colour differences through weights that training never moved from their random init).
    ``pixel_mean``/``pixel_std`` must be the views' normalisation (null: the augment recipes' default, ImageNet's).
    Grey data has no colour to predict: 1-channel inputs are refused (the pretrain stage names data.image_mode).
    Optimiser: Adam lr 3e-5 x B/40 in the paper (betas 0.9, 0.99, weight decay 1e-3); here AdamW at base 1e-3.
    """

    augment = "mim"
    needs_colour = True
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "base_lr": 1e-3,
        "weight_decay": 1e-3,
        "betas": [0.9, 0.99],
        "lr_scaling": "linear",
        "warmup_epochs": 0,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        bin_size: int = 10,
        neighbours: int = 5,
        sigma: float = 5.0,
        output_stride: int = 4,
        decoder_dim: int = 128,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        in_chans = backbone.config.get("in_chans", 3)
        if in_chans != 3:
            raise ValueError(
                f"colorization needs colour images: the backbone takes {in_chans} channel(s) "
                f"(grey data: data.image_mode L); use RGB data (data.image_mode: RGB)"
            )
        pixel_mean = RGB_MEAN if pixel_mean is None else pixel_mean
        pixel_std = RGB_STD if pixel_std is None else pixel_std
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("colorization: pixel_mean and pixel_std need 3 values (the RGB views' normalisation)")
        self.backbone = backbone
        self.neighbours, self.sigma, self.output_stride = neighbours, sigma, output_stride
        self.register_buffer("bins", ab_bins(bin_size).float(), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.decoder = ConvDecoder(backbone.feature_dim, self.bins.shape[0], hidden=decoder_dim)
        self.criterion = ColorizationLoss()

    def split(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised RGB views -> (grey network input, normalised like the views; ab of every pixel)."""
        rgb = (views * self.pixel_std + self.pixel_mean).clamp(0, 1)
        luma = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        grey = (rgb * luma).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        return (grey - self.pixel_mean) / self.pixel_std, rgb_to_lab(rgb.float())[:, 1:]

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        if images.shape[1] != 3:
            raise ValueError(f"colorization needs RGB views, got {images.shape[1]} channel(s) (data.image_mode L?)")
        grey, ab = self.split(images)
        h, w = images.shape[-2:]
        size = (max(1, h // self.output_stride), max(1, w // self.output_stride))
        with torch.no_grad():  # the truth at the output resolution: ab averaged per block, then soft-encoded
            target = soft_encode(
                F.adaptive_avg_pool2d(ab, size), self.bins, neighbours=self.neighbours, sigma=self.sigma
            ).to(images.dtype)
        fmap = feature_map(self.backbone, grey)
        logits = self.decoder(fmap, size)
        loss = self.criterion(logits, target)
        return {"loss": loss, "embedding": fmap.mean(dim=(2, 3)).detach()}

    def exported_backbone(self) -> nn.Module:
        return grey_input_backbone(self.backbone, self.pixel_mean, self.pixel_std)
