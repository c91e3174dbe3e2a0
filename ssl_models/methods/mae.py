"""MAE (He, Chen, Xie, Li, Dollar & Girshick 2022, "Masked Autoencoders Are Scalable Vision Learners",
arXiv 2111.06377): masked image modeling; a ViT encoder sees only the visible patches, a light decoder
reconstructs the (per-patch normalised) pixels of the masked ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backbones import TransformerBlock, VisionTransformer, sincos_position_embedding
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


class MaskedPatchReconstructionLoss(nn.Module):
    """MAE's loss: mean squared error on the masked patches only (section 3, "Reconstruction target").

        L = sum_i m_i * (1/P) sum_j (xhat_ij - t_ij)^2 / sum_i m_i

    over patches i (m_i = 1 if masked) and the P pixel values j of a patch. With ``norm_pix`` the target is each
    patch normalised by its own mean and variance, t_ij = (x_ij - mean_i) / sqrt(var_i + 1e-6), which the paper
    found gives better representations. var_i is the unbiased variance, 1/(P-1) sum_j (x_ij - mean_i)^2, as in the
    official code (facebookresearch/mae, ``target.var(dim=-1)``: torch's default).
    """

    def __init__(self, norm_pix: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_pix = norm_pix
        self.eps = eps

    def target(self, patches: Tensor) -> Tensor:
        if not self.norm_pix:
            return patches
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        return (patches - mean) / torch.sqrt(var + self.eps)

    @float32_loss
    def forward(self, prediction: Tensor, patches: Tensor, mask: Tensor) -> Tensor:
        per_patch = (prediction - self.target(patches)).pow(2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample uniform random masking by sorting noise (vectorised, no per-sample loop).

    Returns keep_index (B x K, visible patches), restore_index (B x N: inverse permutation, to put the decoder's
    [visible, masked] sequence back in patch order) and mask (B x N, 1 = masked, in patch order).
    """
    num_keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    noise = torch.rand(batch, num_patches, device=device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, restore)
    return shuffle[:, :num_keep], restore, mask


@register("mae", family="masked_image_modeling")
class MAE(SSLMethod):
    """ViT encoder on the visible 25% of the patches, a light Transformer decoder with mask tokens, pixel loss.

    Defaults: mask ratio 0.75 and the normalised-pixel target (paper); decoder 128-d, 2 blocks, 4 heads (the
    paper's is 512-d x 8 blocks for ViT-L at 224 px; its ablation shows a shallow decoder suffices and small images
    have 64 patches, so a light decoder keeps the cost where the representation is learned). AdamW
    lr 1.5e-4 x B/256, betas (0.9, 0.95), weight decay 0.05, 40 warmup epochs (paper, appendix A.1).
    """

    augment = "mim"
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "base_lr": 1.5e-4,
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "lr_scaling": "linear",
        "warmup_epochs": 40,
    }
    default_backbone: dict[str, Any] = {"name": "vit_tiny", "patch_size": 4}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(f"mae needs a ViT backbone (vit_tiny, vit_small), got {type(backbone).__name__}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mae: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        patch_dim = backbone.patch_size**2 * backbone.in_chans
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            [TransformerBlock(decoder_dim, decoder_heads) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_dim)
        self.decoder_dim = decoder_dim
        self.criterion = MaskedPatchReconstructionLoss(norm_pix=norm_pix_loss)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def decode(self, latent: Tensor, restore_index: Tensor, grid: tuple[int, int]) -> Tensor:
        """latent (B, 1 + K, D_enc) -> predicted patch pixels (B, N, patch_dim), N = grid[0] * grid[1]."""
        h = self.decoder_embed(latent)
        b, n = restore_index.shape
        cls, visible = h[:, :1], h[:, 1:]
        sequence = torch.cat([visible, self.mask_token.expand(b, n - visible.shape[1], -1)], dim=1)
        sequence = torch.gather(sequence, 1, restore_index.unsqueeze(-1).expand(-1, -1, self.decoder_dim))
        sequence = sequence + sincos_position_embedding(*grid, self.decoder_dim)[None].to(sequence)
        h = torch.cat([cls, sequence], dim=1)
        for block in self.decoder_blocks:
            h = block(h)
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        p = self.backbone.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        patches = self.backbone.patchify(images)
        keep_index, restore_index, mask = random_masking(
            images.shape[0], patches.shape[1], self.mask_ratio, device=images.device
        )
        features = self.backbone.forward_features(images, keep_index=keep_index)
        latent = torch.cat([features["cls"][:, None], features["patch_tokens"]], dim=1)
        prediction = self.decode(latent, restore_index, grid)
        loss = self.criterion(prediction, patches, mask)
        # the monitors watch what evaluation reads: the backbone's pooled output (class token or patch mean)
        pooled = features["cls"] if self.backbone.global_pool == "cls" else features["patch_tokens"].mean(dim=1)
        return {"loss": loss, "embedding": pooled.detach(), "mask_ratio": mask.mean()}
