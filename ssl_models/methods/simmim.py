"""SimMIM (Xie, Zhang, Cao, Lin, Bao, Yao, Dai & Hu 2022, "SimMIM: A Simple Framework for Masked Image
Modeling", arXiv 2111.09886): masked image modeling where masked patches are replaced by a learned mask token,
the encoder sees every position, and a single linear layer predicts the raw pixels of the masked patches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backbones import VisionTransformer
from ..registry import register
from .base import SSLMethod


class MaskedL1Loss(nn.Module):
    """SimMIM's loss (paper eq. 1): the mean absolute error over the masked pixels only,

        L = 1 / (Omega(x_M) * C) * || y_M - x_M ||_1

    where x_M are the pixel values of the masked patches (all C channels), y_M their predictions and Omega(x_M)
    the number of masked pixels. Inputs are per patch: ``prediction`` and ``patches`` (B x N x P, P = p * p * C
    values of a patch) and ``mask`` (B x N, 1 = masked); visible patches do not count.
    """

    def forward(self, prediction: Tensor, patches: Tensor, mask: Tensor) -> Tensor:
        per_patch = (prediction - patches).abs().sum(dim=-1)
        mask = mask.to(per_patch.dtype)
        masked_values = mask.sum() * patches.shape[-1]
        return (per_patch * mask).sum() / masked_values.clamp_min(1.0)


def block_mask(batch: int, grid: tuple[int, int], block: int, mask_ratio: float, device=None) -> Tensor:
    """Random masks (B x gh*gw, 1 = masked) made of ``block`` x ``block`` squares of patches.

    SimMIM masks square blocks larger than a patch (32 px blocks over 16 px ViT patches: block = 2) so that a
    masked pixel is rarely next to a visible one and cannot be interpolated. Each sample masks
    round(mask_ratio * number of blocks) blocks chosen uniformly (vectorised: ranks of random noise). Blocks at
    the border are cropped when the grid is not a multiple of ``block``.
    """
    gh, gw = grid
    bh, bw = -(-gh // block), -(-gw // block)
    num_blocks = bh * bw
    num_masked = min(max(1, int(round(mask_ratio * num_blocks))), num_blocks)
    ranks = torch.rand(batch, num_blocks, device=device).argsort(dim=1).argsort(dim=1)
    blocks = (ranks < num_masked).float().reshape(batch, bh, bw)
    patches = blocks.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :gh, :gw]
    return patches.reshape(batch, gh * gw)


@register("simmim", family="masked_image_modeling")
class SimMIM(SSLMethod):
    """ViT encoder over all patches (masked ones replaced by a learned token) -> linear pixel head -> masked L1.

    Defaults (paper, section 4): mask ratio 0.6, masked blocks of 2 x 2 patches (32 px blocks for 16 px patches),
    a one-layer linear prediction head, raw (input-normalised) pixel targets, crop + flip augmentations;
    AdamW lr 1e-4 x B/256 (8e-4 at batch 2048), weight decay 0.05, 10 warmup epochs. The default ViT averages its
    patch tokens: SimMIM's loss never involves the class token.
    """

    augment = "mim"
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "base_lr": 1e-4,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "lr_scaling": "linear",
        "warmup_epochs": 10,
    }
    default_backbone: dict[str, Any] = {"name": "vit_tiny", "patch_size": 4, "global_pool": "mean"}

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.6, mask_block: int = 2) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(f"simmim needs a ViT backbone (vit_tiny, vit_small), got {type(backbone).__name__}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"simmim: mask_ratio must be in (0, 1), got {mask_ratio}")
        if mask_block < 1:
            raise ValueError(f"simmim: mask_block must be >= 1, got {mask_block}")
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.mask_block = mask_block
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pixel_head = nn.Linear(backbone.embed_dim, backbone.patch_size**2 * backbone.in_chans)
        self.criterion = MaskedL1Loss()

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        p = self.backbone.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        mask = block_mask(images.shape[0], grid, self.mask_block, self.mask_ratio, device=images.device)
        features = self.backbone.forward_features(images, token_mask=mask.bool(), mask_token=self.mask_token)
        prediction = self.pixel_head(features["patch_tokens"])
        loss = self.criterion(prediction, self.backbone.patchify(images), mask)
        pooled = features["cls"] if self.backbone.global_pool == "cls" else features["patch_tokens"].mean(dim=1)
        return {"loss": loss, "embedding": pooled.detach(), "mask_ratio": mask.mean()}
