"""iBOT (Zhou, Wei, Wang, Shen, Xie, Yuille & Kong 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer",
arXiv 2111.07832): DINO's self-distillation of the class token across views, plus masked image modeling in which
the EMA teacher is the tokenizer: the student sees a global view with blocks of patches masked and predicts, at
the masked positions, the teacher's distribution for the unmasked view.

    L_[CLS] = DINO's loss (eq. 3 of DINO) on the class tokens: teacher global crops x student other crops
    L_MIM   = -1/G sum_{v in global crops} 1/B sum_b  sum_i m_bi P_t^patch(u_bi)^T log P_s^patch(u_hat_bi) / sum_i m_bi
    P_t^patch(u) = softmax((h_t(u) - c') / tau_t'),   P_s^patch(u_hat) = softmax(h_s(u_hat) / tau_s)
    L = lambda_cls L_[CLS] + lambda_mim L_MIM

u: the teacher's patch tokens of the unmasked view, u_hat: the student's of the masked one (mask m, masked patches
replaced by a learned token), h one projection head shared by class and patch tokens (paper section 3.3). c' is
the patch tokens' own centre, an EMA of the teacher's mean patch output over the global batch, with its own
teacher temperature tau_t'.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import VisionTransformer
from ..monitors import teacher_entropy
from ..registry import register
from .dino import DINO, DINOLoss, at_least_float32, multicrop_features, teacher_temperature_at


def blockwise_mask(
    grid: tuple[int, int],
    num_masked: int,
    *,
    min_block: int = 16,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 10,
) -> Tensor:
    """BEiT's blockwise masking (Bao et al. 2022, Algorithm 1), used by iBOT: a (gh, gw) bool map.

    Rectangles of random area (>= ``min_block`` patches, at most what is still to mask) and log-uniform aspect
    ratio are added at random positions until ``num_masked`` patches are masked or no rectangle adds any.
    A rectangle that would overshoot the budget is redrawn, so at most ``num_masked`` patches are masked.
    """
    gh, gw = grid
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    while int(mask.sum()) < num_masked:
        budget = num_masked - int(mask.sum())
        added = 0
        for _ in range(max_tries):
            area = min(min_block, budget) + (budget - min(min_block, budget)) * torch.rand(()).item()
            ratio = math.exp(log_lo + (log_hi - log_lo) * torch.rand(()).item())
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (1 <= h < gh and 1 <= w < gw):
                continue
            top = int(torch.randint(0, gh - h + 1, ()).item())
            left = int(torch.randint(0, gw - w + 1, ()).item())
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region.fill_(True)
                added = new
                break
        if added == 0:
            break
    return mask


def ibot_masks(
    batch: int,
    grid: tuple[int, int],
    *,
    ratio: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    min_block: int = 16,
) -> Tensor:
    """Per image: with ``probability`` a blockwise mask of a ratio drawn uniformly from ``ratio``, else no mask
    (iBOT's prediction ratio 0.3 +- 0.2 for half the images). Returns (B, gh * gw) bool, True = masked."""
    n = grid[0] * grid[1]
    masks = []
    for _ in range(batch):
        if torch.rand(()).item() < probability:
            r = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(()).item()
            masks.append(blockwise_mask(grid, int(round(r * n)), min_block=min_block).flatten())
        else:
            masks.append(torch.zeros(n, dtype=torch.bool))
    return torch.stack(masks)


class MaskedPatchDistillationLoss(DINOLoss):
    """L_MIM: teacher patch distributions of the unmasked view -> student's at the masked positions of the same
    view (only masked positions count, averaged per image, then over images and views). The centre c' (DINO's,
    with its own momentum) follows the teacher's mean patch output over every global crop of the global batch."""

    def forward(
        self,
        student_patches: list[Tensor],
        teacher_patches: list[Tensor],
        masks: list[Tensor],
        teacher_temperature: float,
    ) -> Tensor:
        """Per global view: student and teacher patch logits (B, N, K), mask (B, N) bool."""
        total = 0.0
        for s, t, m in zip(student_patches, teacher_patches, masks):
            q = self.teacher_probabilities(t, teacher_temperature)
            log_p = F.log_softmax(at_least_float32(s) / self.student_temperature, dim=-1)
            per_patch = (-q * log_p).sum(dim=-1)
            m = m.to(per_patch.dtype)
            total = total + ((per_patch * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).mean()
        if self.training:
            self.update_center(torch.cat([t.detach().mean(dim=1) for t in teacher_patches]))
        return total / len(student_patches)


@register("ibot", family="self_distillation")
class IBOT(DINO):
    """DINO (student and EMA teacher, shared DINO head, centring, temperature schedules, frozen last layer) plus
    masked patch-token self-distillation on the global crops.

    Defaults (paper section 4.1 and appendix A, ViT-S/16): shared head, K = 8192, 3 layers, 2048 hidden,
    256 bottleneck, last layer not weight-norm-fixed; student temperature 0.1; teacher temperatures 0.04 -> 0.07
    over the first 30% of training for both class and patch tokens; centre momenta 0.9; teacher momentum cosine
    0.996 -> 1; loss weights 1 and 1; prediction ratio uniform in [0.1, 0.5] for half the images, blockwise
    masks with blocks of at least 16 patches (of 196); multi-crop; AdamW lr 5e-4 x B/256, weight decay 0.04,
    10 warmup epochs. Features: what the backbone pools (the class token by default, the token DINO's loss
    trains; ``global_pool: mean`` exports the mean of the patch tokens, which the masked-patch loss trains).
    """

    augment = "multicrop"
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "base_lr": 5e-4,
        "weight_decay": 0.04,
        "lr_scaling": "linear",
        "warmup_epochs": 10,
    }
    default_backbone: dict[str, Any] = {"name": "vit_tiny", "patch_size": 4}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        out_dim: int = 8192,
        head_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = False,
        num_global_crops: int = 2,
        student_temperature: float = 0.1,
        warmup_teacher_temperature: float = 0.04,
        teacher_temperature: float = 0.07,
        warmup_teacher_patch_temperature: float = 0.04,
        teacher_patch_temperature: float = 0.07,
        warmup_teacher_temperature_frac: float = 0.3,
        center_momentum: float = 0.9,
        patch_center_momentum: float = 0.9,
        lambda_cls: float = 1.0,
        lambda_mim: float = 1.0,
        mask_ratio_min: float = 0.1,
        mask_ratio_max: float = 0.5,
        mask_probability: float = 0.5,
        mask_min_block: int = 16,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        freeze_last_layer_frac: float = 0.01,
    ) -> None:
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(f"ibot needs a ViT backbone (vit_tiny, vit_small), got {type(backbone).__name__}")
        if not 0.0 <= mask_ratio_min <= mask_ratio_max < 1.0 or not 0.0 <= mask_probability <= 1.0:
            raise ValueError(
                f"ibot: need 0 <= mask_ratio_min <= mask_ratio_max < 1 and 0 <= mask_probability <= 1, "
                f"got {mask_ratio_min}, {mask_ratio_max}, {mask_probability}"
            )
        if warmup_teacher_patch_temperature <= 0 or teacher_patch_temperature <= 0:
            raise ValueError("ibot: patch teacher temperatures must be > 0")
        if mask_min_block < 1 or lambda_cls < 0 or lambda_mim < 0:
            raise ValueError(
                f"ibot: need mask_min_block >= 1 and loss weights >= 0, got {mask_min_block}, "
                f"{lambda_cls}, {lambda_mim}"
            )
        super().__init__(
            backbone,
            out_dim=out_dim,
            head_hidden_dim=head_hidden_dim,
            bottleneck_dim=bottleneck_dim,
            head_layers=head_layers,
            norm_last_layer=norm_last_layer,
            num_global_crops=num_global_crops,
            student_temperature=student_temperature,
            warmup_teacher_temperature=warmup_teacher_temperature,
            teacher_temperature=teacher_temperature,
            warmup_teacher_temperature_frac=warmup_teacher_temperature_frac,
            center_momentum=center_momentum,
            base_momentum=base_momentum,
            final_momentum=final_momentum,
            freeze_last_layer_frac=freeze_last_layer_frac,
        )
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.patch_criterion = MaskedPatchDistillationLoss(out_dim, student_temperature, patch_center_momentum)
        self.patch_temperature_schedule = (
            warmup_teacher_patch_temperature,
            teacher_patch_temperature,
            warmup_teacher_temperature_frac,
        )
        self.current_teacher_patch_temperature = teacher_patch_temperature
        self.lambdas = (lambda_cls, lambda_mim)
        self.mask_config = {
            "ratio": (mask_ratio_min, mask_ratio_max),
            "probability": mask_probability,
            "min_block": mask_min_block,
        }

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    @property
    def collapse_loss_level(self) -> float:
        """(lambda_cls + lambda_mim) ln K: both terms at a uniform teacher and student."""
        return sum(self.lambdas) * math.log(self.out_dim)

    def before_step(self, step: int, total_steps: int) -> None:
        super().before_step(step, total_steps)
        start, end, frac = self.patch_temperature_schedule
        self.current_teacher_patch_temperature = teacher_temperature_at(
            step, total_steps, start=start, end=end, warmup_frac=frac
        )

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        g = self.num_global_crops
        if len(views) < 2 or len(views) < g:
            raise ValueError(f"ibot needs at least {max(2, g)} views, got {len(views)}")
        global_views = torch.cat(views[:g])
        p = self.backbone.patch_size
        grid = (global_views.shape[-2] // p, global_views.shape[-1] // p)
        masks = ibot_masks(global_views.shape[0], grid, **self.mask_config).to(global_views.device)

        with torch.no_grad():  # the teacher sees the global crops unmasked
            t = self.teacher_backbone.module.forward_features(global_views)
            t_cls = self.teacher_head(t["cls"]).chunk(g)
            t_patch = self.teacher_head(t["patch_tokens"]).chunk(g)
        s = self.backbone.forward_features(global_views, token_mask=masks, mask_token=self.mask_token)
        s_global = self.student_head(torch.cat([s["cls"][:, None], s["patch_tokens"]], dim=1))
        s_cls, s_patch = s_global[:, 0].chunk(g), s_global[:, 1:].chunk(g)
        # the class token is distilled whatever the backbone pools for its exported features
        local_features = multicrop_features(lambda x: self.backbone.forward_features(x)["cls"], views[g:])
        s_local = (
            list(self.student_head(torch.cat(local_features)).split([f.shape[0] for f in local_features]))
            if local_features
            else []
        )

        cls_loss = self.criterion(list(s_cls) + s_local, t_cls, self.current_teacher_temperature)
        mim_loss = self.patch_criterion(
            list(s_patch), list(t_patch), list(masks.chunk(g)), self.current_teacher_patch_temperature
        )
        loss = self.lambdas[0] * cls_loss + self.lambdas[1] * mim_loss
        with torch.no_grad():
            probs = self.criterion.teacher_probabilities(torch.cat(t_cls), self.current_teacher_temperature)
            entropy = teacher_entropy(probs)
        pooled = s["cls"] if self.backbone.global_pool == "cls" else s["patch_tokens"].mean(dim=1)
        return {
            "loss": loss,
            "embedding": pooled.chunk(g)[0].detach(),
            "cls_loss": cls_loss.detach(),
            "mim_loss": mim_loss.detach(),
            "mask_ratio": masks.float().mean(),
            "teacher_entropy": torch.tensor(entropy),
            "teacher_entropy_ratio": torch.tensor(entropy / math.log(self.out_dim)),
            "teacher_temperature": torch.tensor(self.current_teacher_temperature),
            "target_momentum": torch.tensor(self.teacher_backbone.momentum),
        }
