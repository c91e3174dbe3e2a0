"""I-JEPA (Assran, Duval, Misra, Bojanowski, Vincent, Rabbat, LeCun & Ballas 2023, "Self-Supervised Learning
from Images with a Joint-Embedding Predictive Architecture", arXiv 2301.08243): predict the representations of
masked regions, not their pixels. A context encoder sees one large block of the image; a narrow predictor,
told only the positions of four target blocks, predicts what an EMA target encoder outputs there.

    s_y = LayerNorm(f_theta_bar(y))              target encoder on the full image, then its patches of block B_i
    s_x = f_theta(x)                             context encoder on the context block (target patches removed)
    s_hat_y(i) = g_phi(s_x, {m + p_j : j in B_i})   mask token m plus the position embedding p_j of each target
    L = 1/M sum_{i=1..M} 1/|B_i| sum_{j in B_i} ||s_hat_y(i)_j - s_y_j||^2          (paper eq. 1, M = 4)

theta_bar <- tau theta_bar + (1 - tau) theta with tau rising linearly from 0.996 to 1 over training. The encoder
that is evaluated (and exported) is the target encoder f_theta_bar, average-pooled (paper appendix A.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import TransformerBlock, VisionTransformer, jepa_init_, sincos_position_embedding
from ..heads import ema_update, make_teacher
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def block_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[int, int]:
    """One block shape (h, w) in patches: area scale x N (N = patches in the grid), aspect ratio h / w.

    As in the paper's mask collator, the shape is drawn once per batch (every image gets same-sized blocks,
    so the target sequences stack), rounded, and clipped to the grid.
    """
    return block_shape(grid, _uniform(*scale), _uniform(*aspect))


def block_shape(grid: tuple[int, int], scale: float, ratio: float) -> tuple[int, int]:
    """The block (h, w) in patches of area ``scale`` x N and aspect ``ratio`` = h / w, rounded, clipped to the grid."""
    gh, gw = grid
    area = scale * gh * gw
    h = int(round(math.sqrt(area * ratio)))
    w = int(round(math.sqrt(area / ratio)))
    return min(max(h, 1), gh), min(max(w, 1), gw)


def _place_block(grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """A (gh, gw) bool map with one block of ``size`` at a uniformly random position."""
    gh, gw = grid
    h, w = size
    top = int(torch.randint(0, gh - h + 1, ()).item())
    left = int(torch.randint(0, gw - w + 1, ()).item())
    block = torch.zeros(gh, gw, dtype=torch.bool)
    block[top : top + h, left : left + w] = True
    return block


def multiblock_masks(
    batch: int,
    grid: tuple[int, int],
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_context: int = 4,
    max_tries: int = 20,
) -> tuple[Tensor, Tensor]:
    """I-JEPA's multi-block masking (paper section 3, figure 4) for a batch on a ``grid`` of patches.

    Per batch: one target shape (scale ``target_scale``, aspect ``target_aspect``) and one square context shape
    (scale ``context_scale``, aspect 1). Per image: ``num_targets`` target blocks at random positions (they may
    overlap one another) and one context block with every target patch removed, so the context never contains
    a patch it is asked to predict. Targets that leave fewer than ``min_context`` patches outside them are redrawn
    (up to ``max_tries``, then a ValueError: the grid is too small for the blocks); a context block left with fewer
    than ``min_context`` patches is redrawn (up to ``max_tries``, then it is every non-target patch). Contexts are
    cut to the batch's smallest one by keeping a random subset of each (the paper's code keeps the first indices,
    which favours the top rows).

    Returns ``context_index`` (B, K) and ``target_index`` (num_targets, B, T), patch indices in row-major order.
    """
    gh, gw = grid
    target_shape = block_size(grid, target_scale, target_aspect)
    context_shape = block_size(grid, context_scale, (1.0, 1.0))
    targets, contexts = [], []
    for _ in range(batch):
        for _ in range(max_tries):
            blocks = [_place_block(grid, target_shape) for _ in range(num_targets)]
            covered = torch.stack(blocks).any(dim=0)
            if (~covered).sum() >= min_context:
                break
        else:  # an empty context would reach the encoder as a sequence of no patches (a NaN mean)
            raise ValueError(
                f"ijepa: a {gh} x {gw} patch grid leaves fewer than {min_context} context patches beside "
                f"{num_targets} target blocks of {target_shape[0]} x {target_shape[1]} patches ({max_tries} draws); "
                "use a smaller patch_size, target_scale_max or num_targets"
            )
        for _ in range(max_tries):
            context = _place_block(grid, context_shape) & ~covered
            if context.sum() >= min_context:
                break
        else:
            context = ~covered
        targets.append(torch.stack([b.flatten().nonzero().squeeze(1) for b in blocks]))
        contexts.append(context.flatten().nonzero().squeeze(1))
    keep = min(len(c) for c in contexts)
    contexts = [c[torch.randperm(len(c))[:keep]].sort().values for c in contexts]
    return torch.stack(contexts), torch.stack(targets, dim=1)


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B, N, D), index (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class JEPAPredictor(nn.Module):
    """The predictor g_phi: a narrow ViT over [context tokens, mask tokens at the target positions].

    Context tokens are projected to ``dim`` and get their position embedding again; each target patch is the
    shared learned mask token plus its position embedding. The blocks see nothing of the image but the context,
    and nothing of the targets but where they are. Outputs at the target slots are projected back to the
    encoder's width. Each target block is predicted in its own sequence (the caller repeats the context), so
    the mask tokens of one block never attend to another's.
    """

    def __init__(self, embed_dim: int, dim: int = 96, depth: int = 6, num_heads: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([TransformerBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        jepa_init_(self, self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, context: Tensor, context_index: Tensor, target_index: Tensor, grid: tuple[int, int]) -> Tensor:
        """context (B, K, D_enc) at patches context_index (B, K); target_index (B, T) -> (B, T, D_enc)."""
        pos = sincos_position_embedding(*grid, self.dim).to(context)
        x = self.embed(context) + pos[context_index]
        queries = self.mask_token.to(x.dtype) + pos[target_index]
        h = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.proj(self.norm(h[:, x.shape[1] :]))


class JEPALoss(nn.Module):
    """Distance between predicted and target patch representations, averaged over blocks, patches and channels.

    ``"l2"``: the paper's squared error (eq. 1, up to the constant 1/D); ``"smooth_l1"``: what the official
    code (facebookresearch/ijepa, src/train.py) trains with, F.smooth_l1_loss with beta 1.
    """

    def __init__(self, kind: str = "l2") -> None:
        super().__init__()
        if kind not in ("l2", "smooth_l1"):
            raise ValueError(f"ijepa: loss must be 'l2' or 'smooth_l1', got {kind!r}")
        self.kind = kind

    @float32_loss
    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.kind == "l2":
            return F.mse_loss(prediction, target)
        return F.smooth_l1_loss(prediction, target)


def linear_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """I-JEPA's EMA momentum: linear from ``base`` at step 0 to ``final`` at the end of training."""
    if total_steps <= 0:
        return base
    return base + (final - base) * min(max(step / total_steps, 0.0), 1.0)


@register("ijepa", family="masked_image_modeling")
class IJEPA(SSLMethod):
    """Context encoder + EMA target encoder (the exported ViT) + narrow predictor, multi-block masking.

    Family: masked image modeling (the masked regions are predicted, in representation space rather than pixels).

    Defaults (paper section 4 and appendix; the official configs): 4 target blocks, scale 0.15-0.2, aspect
    0.75-1.5; one context block, scale 0.85-1.0; targets layer-normalised (no affine); EMA momentum linear
    0.996 -> 1; AdamW lr 1e-3 at batch 2048 (1.25e-4 x B/256), weight decay 0.04 (the paper ramps it to 0.4),
    40 warmup epochs; L2 loss. The paper's predictor is 12 blocks of 384 channels behind a ViT-H (1280); for the
    ViT-Tiny default (192) it is 6 blocks of 96 channels, 4 heads: narrower than the encoder, as in the paper.
    Both networks start from the official code's initialisation (the backbone's ``init: jepa``, the predictor
    likewise: :func:`~ssl_models.backbones.jepa_init_`), so the random-init baseline starts there too.
    Export and evaluation take the target encoder, as the paper does ("we use the target-encoder for
    evaluation", appendix A.1); features are the mean of its patch tokens (I-JEPA trains no objective on a class
    token).
    """

    augment = "mim"
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "base_lr": 1.25e-4,
        "weight_decay": 0.04,
        "betas": [0.9, 0.999],
        "lr_scaling": "linear",
        "warmup_epochs": 40,
    }
    default_backbone: dict[str, Any] = {"name": "vit_tiny", "patch_size": 4, "global_pool": "mean", "init": "jepa"}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_targets: int = 4,
        target_scale_min: float = 0.15,
        target_scale_max: float = 0.2,
        target_aspect_min: float = 0.75,
        target_aspect_max: float = 1.5,
        context_scale_min: float = 0.85,
        context_scale_max: float = 1.0,
        min_context_patches: int = 4,
        predictor_dim: int = 96,
        predictor_depth: int = 6,
        predictor_heads: int = 4,
        loss: str = "l2",
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(f"ijepa needs a ViT backbone (vit_tiny, vit_small), got {type(backbone).__name__}")
        for lo, hi, what in (
            (target_scale_min, target_scale_max, "target_scale"),
            (context_scale_min, context_scale_max, "context_scale"),
        ):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"ijepa: need 0 < {what}_min <= {what}_max <= 1, got {lo}, {hi}")
        if not 0.0 < target_aspect_min <= target_aspect_max:
            raise ValueError(
                f"ijepa: need 0 < target_aspect_min <= target_aspect_max, got {target_aspect_min}, {target_aspect_max}"
            )
        if num_targets < 1 or min_context_patches < 1:
            raise ValueError(
                f"ijepa: num_targets and min_context_patches must be >= 1, got {num_targets}, {min_context_patches}"
            )
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(
                f"ijepa: need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}"
            )
        gh, gw = backbone.grid_size
        largest = max(
            math.prod(block_shape((gh, gw), target_scale_max, a)) for a in (target_aspect_min, 1.0, target_aspect_max)
        )
        if gh * gw - largest < min_context_patches:
            raise ValueError(
                f"ijepa: the {gh} x {gw} patch grid (image_size {backbone.config['image_size']}, patch_size "
                f"{backbone.patch_size}) leaves fewer than min_context_patches={min_context_patches} patches beside "
                f"one target block of {largest} patches; use a smaller patch_size or target_scale_max"
            )
        self.backbone = backbone
        self.target_encoder = make_teacher(backbone)
        self.predictor = JEPAPredictor(backbone.embed_dim, predictor_dim, predictor_depth, predictor_heads)
        self.criterion = JEPALoss(loss)
        self.mask_config = {
            "num_targets": num_targets,
            "target_scale": (target_scale_min, target_scale_max),
            "target_aspect": (target_aspect_min, target_aspect_max),
            "context_scale": (context_scale_min, context_scale_max),
            "min_context": min_context_patches,
        }
        self.base_momentum, self.final_momentum = base_momentum, final_momentum
        self.momentum = base_momentum

    @torch.no_grad()
    def targets(self, images: Tensor, target_index: Tensor) -> Tensor:
        """s_y: the target encoder's layer-normalised patch tokens of each block, (M * B, T, D), block-major."""
        tokens = self.target_encoder.forward_features(images)["patch_tokens"]
        tokens = F.layer_norm(tokens, tokens.shape[-1:])
        return torch.cat([gather_tokens(tokens, index) for index in target_index])

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        p = self.backbone.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        context_index, target_index = multiblock_masks(images.shape[0], grid, **self.mask_config)
        context_index, target_index = context_index.to(images.device), target_index.to(images.device)
        target = self.targets(images, target_index)
        context = self.backbone.forward_features(images, keep_index=context_index)["patch_tokens"]
        m = target_index.shape[0]
        prediction = self.predictor(
            context.repeat(m, 1, 1), context_index.repeat(m, 1), target_index.flatten(0, 1), grid
        )
        loss = self.criterion(prediction, target)
        return {
            "loss": loss,
            "embedding": context.mean(dim=1).detach(),
            "context_ratio": torch.tensor(context_index.shape[1] / (grid[0] * grid[1])),
            "target_momentum": torch.tensor(self.momentum),
        }

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.momentum = linear_momentum(step, total_steps, self.base_momentum, self.final_momentum)
        ema_update(self.target_encoder, self.backbone, self.momentum)

    def exported_backbone(self) -> nn.Module:
        return self.target_encoder

    def teacher_modules(self) -> dict[str, nn.Module]:
        return {"target_encoder": self.target_encoder}
