"""Context encoder (Pathak, Krahenbuhl, Donahue, Darrell & Efros 2016, "Context Encoders: Feature Learning by
Inpainting", arXiv 1604.07379): information restoration; an encoder sees the image with a region removed and a
decoder paints the region back from its context.

    x_ctx = (1 - M) * x                          M: the removed region (1 = removed), filled with the mean
    R = M dilated by the overlap o               the predicted region: the hole plus a ring of o visible pixels
    W = 1 on M, w_o on R - M                     the overlap ring weighs w_o = 10x
    L_rec = sum W * (x - F(x_ctx))^2 / (C sum W)     the (weighted) normalised masked L2 of the paper's eq. 1
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import feature_map
from ..heads import ConvDecoder
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod

MASK_KINDS = ("center", "random_block")


def region_mask(
    batch: int, height: int, width: int, *, kind: str, fraction: float, block_fraction: float | None = None, device=None
) -> Tensor:
    """(B, 1, H, W) float mask, 1 = removed (paper sec. 3.3).

    ``center``: the central square of side ``fraction`` x the image side (paper: the central 64 x 64 of
    128 x 128, fraction 0.5). ``random_block``: "a number of smaller possibly overlapping masks, covering up to
    1/4 of the image": squares of side ``block_fraction`` x the side (default: ``fraction``, one block) at
    random positions, added per image until they cover the centre square's area (``fraction``^2 of the image;
    the last block may overlap the others). The paper's third kind, random regions, takes its shapes from
    PASCAL segmentation masks, which this data does not have.
    """
    side_h, side_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    mask = torch.zeros(batch, 1, height, width, device=device)
    if kind == "center":
        y0, x0 = (height - side_h) // 2, (width - side_w) // 2
        mask[:, :, y0 : y0 + side_h, x0 : x0 + side_w] = 1
    elif kind == "random_block":
        bf = fraction if block_fraction is None else block_fraction
        bh, bw = max(1, round(height * bf)), max(1, round(width * bf))
        area = side_h * side_w
        for i in range(batch):
            while mask[i].sum() < area:
                y0 = int(torch.randint(0, height - bh + 1, ()))
                x0 = int(torch.randint(0, width - bw + 1, ()))
                mask[i, :, y0 : y0 + bh, x0 : x0 + bw] = 1
    else:
        raise ValueError(f"inpainting: mask must be one of {', '.join(MASK_KINDS)}, got {kind!r}")
    return mask


def overlap_weights(mask: Tensor, overlap: int, overlap_weight: float) -> Tensor:
    """W: 1 on the removed region, ``overlap_weight`` on the ring of ``overlap`` pixels around it (the context the
    encoder sees and the decoder must also paint, so the inpainting blends with it), 0 elsewhere."""
    if overlap <= 0:
        return mask
    region = F.max_pool2d(mask, 2 * overlap + 1, stride=1, padding=overlap)
    return mask + overlap_weight * (region - mask)


class MaskedReconstructionLoss(nn.Module):
    """The context encoder's reconstruction loss (paper, eq. 1), the normalised masked L2 with the overlap
    weighting of the paper's implementation (its predicted region overlaps the context by a few pixels whose
    loss weighs 10x; official code: overlapPred 4 px of 128, overlapL2Weight 10):

        L_rec(x) = sum W * (x - F((1 - M) * x))^2 / (C sum W)

    with W from :func:`overlap_weights` (W = M without an overlap): squared error over the predicted pixels
    only, a weighted mean over them (and channels). The paper's joint loss adds lambda_adv L_adv (lambda_rec
    0.999, lambda_adv 0.001); the adversarial term is not implemented here (see :class:`Inpainting`).
    """

    @float32_loss
    def forward(self, prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        err = (prediction - target).pow(2) * weights
        return err.sum() / (weights.sum() * target.shape[1]).clamp_min(1e-12)


@register("inpainting", family="origins", category="information_restoration")
class Inpainting(SSLMethod):
    """Backbone on the image with its region filled with 0 (the dataset mean after normalisation; the paper fills
    the mean colour) -> its feature map -> :class:`ConvDecoder` -> the removed pixels (decoder dropped at export).

    Defaults (paper and its official code): the central square of half the side; L2 on the region and on an
    overlap ring of 4 px of 128 (``overlap`` 0.03125 of the side) weighted 10x; Adam lr 2e-4 (here AdamW,
    x B/256 from batch 64), betas (0.5, 0.999). Only the reconstruction loss: the adversarial discriminator
    (lambda_adv 0.001 in the paper, sharper inpaintings but not better features in its feature-learning
    experiments, which used the L2 loss alone for AlexNet) is not implemented. With the central region the
    paper's network learnt low-level features tied to the mask's fixed boundary, so its feature-learning results
    use random masks: ``mask: random_block``.
    """

    augment = "mim"
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "base_lr": 8e-4,
        "weight_decay": 0.0,
        "betas": [0.5, 0.999],
        "lr_scaling": "linear",
        "warmup_epochs": 0,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        mask: str = "center",
        mask_fraction: float = 0.5,
        block_fraction: float | None = None,
        overlap: float = 0.03125,
        overlap_weight: float = 10.0,
        decoder_dim: int = 64,
    ) -> None:
        super().__init__()
        if mask not in MASK_KINDS:
            raise ValueError(f"inpainting: mask must be one of {', '.join(MASK_KINDS)}, got {mask!r}")
        if not 0.0 < mask_fraction < 1.0:
            raise ValueError(f"inpainting: mask_fraction must be in (0, 1), got {mask_fraction}")
        if block_fraction is not None and not 0.0 < block_fraction <= mask_fraction:
            raise ValueError(f"inpainting: block_fraction must be in (0, mask_fraction], got {block_fraction}")
        if not 0.0 <= overlap < 0.5 or overlap_weight < 0:
            raise ValueError(
                f"inpainting: need 0 <= overlap < 0.5 and overlap_weight >= 0, got {overlap}, {overlap_weight}"
            )
        self.backbone = backbone
        self.mask_kind, self.mask_fraction, self.block_fraction = mask, mask_fraction, block_fraction
        self.overlap, self.overlap_weight = overlap, overlap_weight
        in_chans = backbone.config.get("in_chans", 3)
        self.decoder = ConvDecoder(backbone.feature_dim, in_chans, hidden=decoder_dim)
        self.criterion = MaskedReconstructionLoss()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        b, _, h, w = images.shape
        mask = region_mask(
            b,
            h,
            w,
            kind=self.mask_kind,
            fraction=self.mask_fraction,
            block_fraction=self.block_fraction,
            device=images.device,
        )
        weights = overlap_weights(mask, round(self.overlap * min(h, w)), self.overlap_weight)
        context = images * (1 - mask)
        fmap = feature_map(self.backbone, context)
        prediction = self.decoder(fmap, (h, w))
        loss = self.criterion(prediction, images, weights)
        return {"loss": loss, "embedding": fmap.mean(dim=(2, 3)).detach(), "masked_fraction": mask.mean()}
