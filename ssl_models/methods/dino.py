"""DINO (Caron, Touvron, Misra, Jegou, Mairal, Bojanowski & Joulin 2021, "Emerging Properties in Self-Supervised
Vision Transformers", arXiv 2104.14294): self-distillation with no labels. A student matches the centred,
sharpened output distribution of an EMA teacher across multi-crop views."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..heads import DINOHead, EMATeacher
from ..monitors import teacher_entropy
from ..registry import register
from .base import SSLMethod


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 when it is half precision (autocast), unchanged otherwise: softmaxes over K logits and
    their centre are computed in full precision, and float64 inputs (tests) keep theirs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def multicrop_features(backbone: nn.Module, views: Sequence[Tensor]) -> list[Tensor]:
    """Backbone features of every view, one forward per run of consecutive same-size views.

    Multi-crop (SwAV, DINO) mixes global and local crops; same-size crops are batched together (fewer, larger
    forwards), and crops of different sizes never share a forward (nor BatchNorm statistics), as in DINO's
    multi-crop wrapper. Returns the features per view, in view order.
    """
    features: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out = backbone(torch.cat(list(views[start:end])))
        features.extend(out.chunk(end - start))
        start = end
    return features


class DINOLoss(nn.Module):
    """DINO's cross-entropy between teacher and student crops (paper eq. 3 and Algorithm 1):

        P_t(x) = softmax((g_t(x) - c) / tau_t),   P_s(x') = softmax(g_s(x') / tau_s)
        L = 1/M sum_{x in global crops} sum_{x' in all crops, x' != x} H(P_t(x), P_s(x')),
        H(a, b) = -sum_k a_k log b_k  (averaged over the batch),

    M the number of (x, x') pairs. The teacher is a constant (stop-gradient); c is the centre, an EMA of the
    teacher's mean output, c <- m c + (1 - m) mean_batch g_t(x) (over every global crop of the global batch),
    updated after the loss in training mode. Centring keeps one dimension from dominating; the low teacher
    temperature (sharpening) keeps the output from going uniform: together they avoid collapse.
    """

    def __init__(self, out_dim: int, student_temperature: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if student_temperature <= 0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(
                f"DINO: need student_temperature > 0 and 0 <= center_momentum <= 1, got "
                f"{student_temperature}, {center_momentum}"
            )
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probabilities(self, teacher_out: Tensor, teacher_temperature: float) -> Tensor:
        return F.softmax((at_least_float32(teacher_out.detach()) - self.center) / teacher_temperature, dim=-1)

    def forward(
        self, student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], teacher_temperature: float
    ) -> Tensor:
        """student_out: logits per crop (all crops, global ones first); teacher_out: logits per global crop."""
        if len(student_out) < 2 or not 1 <= len(teacher_out) <= len(student_out):
            raise ValueError(
                f"DINO needs >= 2 student crops and 1..n teacher crops, got {len(student_out)}, {len(teacher_out)}"
            )
        teacher_probs = [self.teacher_probabilities(t, teacher_temperature) for t in teacher_out]
        student_log_probs = [F.log_softmax(at_least_float32(s) / self.student_temperature, dim=-1) for s in student_out]
        total, pairs = 0.0, 0
        for i, q in enumerate(teacher_probs):
            for v, log_p in enumerate(student_log_probs):
                if v == i:  # the same crop seen by both networks is not a prediction task
                    continue
                total = total + (-q * log_p).sum(dim=-1).mean()
                pairs += 1
        if self.training:
            self.update_center(torch.cat([t.detach() for t in teacher_out]))
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        rows = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        batch_sum = distributed.all_reduce_sum(at_least_float32(teacher_out).sum(dim=0, keepdim=True))
        batch_center = batch_sum / distributed.all_reduce_sum(rows)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def teacher_temperature_at(step: int, total_steps: int, *, start: float, end: float, warmup_frac: float) -> float:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over the first ``warmup_frac`` of training."""
    warmup = warmup_frac * total_steps
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


@register("dino", family="self_distillation")
class DINO(SSLMethod):
    """Student: backbone -> DINO head on all crops; teacher: EMA copy on the 2 global crops; DINOLoss between.

    Defaults (paper, section 3 and appendix): head 3 layers 2048 hidden, 256 bottleneck, weight-normalised last
    layer; student temperature 0.1, teacher temperature warmed up linearly 0.04 -> 0.07 over the first 30% of
    training (30 of 100 epochs), centre momentum 0.9, teacher momentum cosine 0.996 -> 1; last layer frozen
    during the first 1% of training (the first epoch of 100); multi-crop augmentations; AdamW lr 5e-4 x B/256,
    weight decay 0.04, 10 warmup epochs (the paper also ramps weight decay to 0.4 and clips gradients at 3: the
    pretrain stage's grad_clip knob). Output dimension K = 4096: the paper's 65,536 is tuned for ImageNet;
    CIFAR-scale reproductions use 4,096, and the head's last layer stays CPU-sized.

    Diagnostics: ``teacher_entropy`` (nats; ln K = uniform, i.e. collapse by flattening; 0 = one-hot),
    ``teacher_entropy_ratio`` (entropy / ln K), ``teacher_student_kl`` (loss minus teacher entropy: near 0 when
    student and teacher agree on a collapsed output, the paper's figure 7).
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
        out_dim: int = 4096,
        head_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        num_global_crops: int = 2,
        student_temperature: float = 0.1,
        warmup_teacher_temperature: float = 0.04,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature_frac: float = 0.3,
        center_momentum: float = 0.9,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        freeze_last_layer_frac: float = 0.01,
    ) -> None:
        super().__init__()
        if num_global_crops < 1:
            raise ValueError(f"dino: num_global_crops must be >= 1, got {num_global_crops}")
        if warmup_teacher_temperature <= 0 or teacher_temperature <= 0:
            raise ValueError("dino: teacher temperatures must be > 0")
        self.backbone = backbone
        self.head = DINOHead(
            backbone.feature_dim,
            out_dim,
            hidden_dim=head_hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=head_layers,
            norm_last_layer=norm_last_layer,
        )
        self.teacher_backbone = EMATeacher(backbone, base_momentum=base_momentum, final_momentum=final_momentum)
        self.teacher_head = EMATeacher(self.head, base_momentum=base_momentum, final_momentum=final_momentum)
        self.criterion = DINOLoss(out_dim, student_temperature, center_momentum)
        self.out_dim = out_dim
        self.num_global_crops = num_global_crops
        self.teacher_temperature_schedule = (
            warmup_teacher_temperature,
            teacher_temperature,
            warmup_teacher_temperature_frac,
        )
        self.current_teacher_temperature = (
            warmup_teacher_temperature if warmup_teacher_temperature_frac > 0 else teacher_temperature
        )
        self.freeze_last_layer_frac = freeze_last_layer_frac
        self.last_layer_frozen = False

    def student_head(self, features: Tensor) -> Tensor:
        """The student head; while the last layer is frozen it runs on detached copies of that layer's parameters,
        so they get no gradient at all (the paper's code sets their .grad to None) while the rest of the head
        trains. requires_grad stays untouched, so an optimizer or DDP built at the start sees the same set."""
        if not self.last_layer_frozen:
            return self.head(features)
        frozen = {name: p.detach() for name, p in self.head.named_parameters() if name.startswith("last_layer")}
        return torch.func.functional_call(self.head, frozen, (features,))

    @property
    def collapse_loss_level(self) -> float:
        """ln K: the loss of a student and teacher that both output the uniform distribution."""
        return math.log(self.out_dim)

    def on_train_start(self, total_steps: int) -> None:
        self.before_step(0, total_steps)

    def before_step(self, step: int, total_steps: int) -> None:
        start, end, frac = self.teacher_temperature_schedule
        self.current_teacher_temperature = teacher_temperature_at(
            step, total_steps, start=start, end=end, warmup_frac=frac
        )
        self.last_layer_frozen = step < self.freeze_last_layer_frac * total_steps

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2 or len(views) < self.num_global_crops:
            raise ValueError(f"dino needs at least {max(2, self.num_global_crops)} views, got {len(views)}")
        student_features = multicrop_features(self.backbone, views)
        crop_sizes = [f.shape[0] for f in student_features]
        student_out = self.student_head(torch.cat(student_features)).split(crop_sizes)
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_backbone(torch.cat(views[: self.num_global_crops])))
            teacher_out = teacher_out.chunk(self.num_global_crops)
            probs = self.criterion.teacher_probabilities(torch.cat(teacher_out), self.current_teacher_temperature)
            entropy = teacher_entropy(probs)
        loss = self.criterion(student_out, teacher_out, self.current_teacher_temperature)
        return {
            "loss": loss,
            "embedding": student_features[0].detach(),
            "teacher_entropy": torch.tensor(entropy),
            "teacher_entropy_ratio": torch.tensor(entropy / math.log(self.out_dim)),
            "teacher_student_kl": loss.detach() - entropy,
            "teacher_temperature": torch.tensor(self.current_teacher_temperature),
            "target_momentum": torch.tensor(self.teacher_backbone.momentum),
        }

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher_backbone.update(self.backbone, step, total_steps)
        self.teacher_head.update(self.head, step, total_steps)

    def teacher_modules(self) -> dict[str, nn.Module]:
        return {"teacher_backbone": self.teacher_backbone, "teacher_head": self.teacher_head}
