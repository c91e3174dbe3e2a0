"""Context encoder (Pathak, Krahenbuhl, Donahue, Darrell & Efros 2016, "Context Encoders: Feature Learning by
Inpainting", arXiv 1604.07379): information restoration; an encoder sees the image with a region removed and a
decoder paints the region back from its context."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backbones import feature_map
from ..heads import ConvDecoder
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod

MASK_KINDS = ("center", "random_block")


def region_mask(batch: int, height: int, width: int, *, kind: str, fraction: float, device=None) -> Tensor:
    """(B, 1, H, W) float mask, 1 = removed. ``center``: the central square of side ``fraction`` x the image side
    (paper: the central 64 x 64 of 128 x 128, fraction 0.5). ``random_block``: a square of the same size at a
    random position per image (the paper's "random block"; its random-region shapes from segmentation masks need
    masks this data does not have)."""
    side_h, side_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    mask = torch.zeros(batch, 1, height, width, device=device)
    if kind == "center":
        y0, x0 = (height - side_h) // 2, (width - side_w) // 2
        mask[:, :, y0:y0 + side_h, x0:x0 + side_w] = 1
    elif kind == "random_block":
        ys = torch.randint(0, height - side_h + 1, (batch,)).tolist()
        xs = torch.randint(0, width - side_w + 1, (batch,)).tolist()
        for i, (y0, x0) in enumerate(zip(ys, xs)):
            mask[i, :, y0:y0 + side_h, x0:x0 + side_w] = 1
    else:
        raise ValueError(f"inpainting: mask must be one of {', '.join(MASK_KINDS)}, got {kind!r}")
    return mask


class MaskedReconstructionLoss(nn.Module):
    """The context encoder's reconstruction loss (paper, eq. 1), the normalised masked L2:

        L_rec(x) = || M * (x - F((1 - M) * x)) ||_2^2 / (C sum M)

    with M the removed region and F the encoder-decoder: squared error over the removed pixels only, averaged
    over them (and channels). The paper's joint loss adds lambda_adv L_adv (lambda_rec 0.999, lambda_adv 0.001);
    the adversarial term is not implemented here (see :class:`Inpainting`).
    """

    @float32_loss
    def forward(self, prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        err = (prediction - target).pow(2) * mask
        return err.sum() / (mask.sum() * target.shape[1]).clamp_min(1.0)


@register("inpainting", family="origins", category="information_restoration")
class Inpainting(SSLMethod):
    """Backbone on the image with its region filled with 0 (the dataset mean after normalisation; the paper fills
    the mean colour) -> its feature map -> :class:`ConvDecoder` -> the removed pixels (decoder dropped at export).

    Defaults (paper): the central square of half the side, L2 on the region only (the paper's overlap of 7 px
    with 10x weight is left out), Adam lr 2e-4 (here AdamW, x B/256 from batch 64), betas (0.5, 0.999). Only the
    reconstruction loss: the adversarial discriminator (lambda_adv 0.001 in the paper, sharper inpaintings but
    not better features in its feature-learning experiments, which used the L2 loss alone for AlexNet) is not
    implemented.
    """

    augment = "mim"
    optimizer: dict[str, Any] = {"name": "adamw", "base_lr": 8e-4, "weight_decay": 0.0, "betas": [0.5, 0.999],
                                 "lr_scaling": "linear", "warmup_epochs": 0}
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(self, backbone: nn.Module, *, mask: str = "center", mask_fraction: float = 0.5,
                 decoder_dim: int = 64) -> None:
        super().__init__()
        if mask not in MASK_KINDS:
            raise ValueError(f"inpainting: mask must be one of {', '.join(MASK_KINDS)}, got {mask!r}")
        if not 0.0 < mask_fraction < 1.0:
            raise ValueError(f"inpainting: mask_fraction must be in (0, 1), got {mask_fraction}")
        self.backbone = backbone
        self.mask_kind, self.mask_fraction = mask, mask_fraction
        in_chans = backbone.config.get("in_chans", 3)
        self.decoder = ConvDecoder(backbone.feature_dim, in_chans, hidden=decoder_dim)
        self.criterion = MaskedReconstructionLoss()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        b, _, h, w = images.shape
        mask = region_mask(b, h, w, kind=self.mask_kind, fraction=self.mask_fraction, device=images.device)
        context = images * (1 - mask)
        fmap = feature_map(self.backbone, context)
        prediction = self.decoder(fmap, (h, w))
        loss = self.criterion(prediction, images, mask)
        return {"loss": loss, "embedding": fmap.mean(dim=(2, 3)).detach(), "masked_fraction": mask.mean()}
