"""Heads on top of a backbone and the EMA teacher: the pieces methods are assembled from.

* :func:`build_mlp`: projectors and predictors (SimCLR, BYOL, VICReg, MoCo v3, Barlow Twins ...);
* :class:`DINOHead`: MLP, l2-normalised bottleneck, weight-normalised last layer (Caron et al. 2021);
* :class:`Prototypes`: SwAV's prototype vectors, kept on the unit sphere (Caron et al. 2020);
* :class:`ConvDecoder`: feature map -> image-sized output, for the dense pretext tasks (inpainting, denoising);
* :func:`make_teacher`, :func:`ema_update`, :func:`cosine_momentum`, :class:`EMATeacher`: the momentum teacher
  of BYOL / MoCo / DINO, momentum following a cosine from its base value to 1 (Grill et al. 2020).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def build_mlp(
    dims: Sequence[int],
    *,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    last_batch_norm_affine: bool = True,
    activation: type[nn.Module] = nn.ReLU,
    last_bias: bool = True,
) -> nn.Sequential:
    """An MLP ``dims[0] -> dims[1] -> ... -> dims[-1]``.

    Hidden layers: Linear (no bias when followed by BN) -> BatchNorm1d (if ``batch_norm``) -> activation.
    Last layer: Linear, optionally followed by a BatchNorm1d (``last_batch_norm``; SimCLR v2, MoCo v3 and Barlow
    Twins put one there, MoCo v3 without affine parameters). ``len(dims) - 1`` linear layers in all.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"build_mlp needs at least an input and an output size >= 1, got {dims}")
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        layers.append(activation())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias and not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_batch_norm_affine))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head: MLP (GELU) -> bottleneck -> l2-normalise -> weight-normalised linear to K logits.

    The last layer is ``x -> g * (V / ||V||_row) x`` (weight normalisation, Salimans & Kingma 2016) without bias;
    with ``norm_last_layer=True`` (DINO's default for stability) the gain g is fixed to 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs num_layers >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        self.mlp = build_mlp(dims, batch_norm=batch_norm, activation=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer_direction = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_layer_direction, std=0.02)
        self.last_layer_gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        weight = self.last_layer_gain * F.normalize(self.last_layer_direction, dim=1)
        return F.linear(x, weight)


class Prototypes(nn.Module):
    """SwAV's K prototype vectors c_k (rows of a bias-free linear layer): scores = z @ C^T for l2-normalised z.

    Call :meth:`normalize_` before each forward (SwAV renormalises the prototypes every step) so scores are
    cosine similarities.
    """

    def __init__(self, dim: int, num_prototypes: int = 3000) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, num_prototypes, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.layer(z)


class ConvDecoder(nn.Module):
    """Feature map (B, in_channels, h, w) -> image-sized output (B, out_channels, H, W).

    ``2x bilinear upsampling -> 3x3 conv -> BN -> ReLU`` (``hidden`` channels) until the map is at least the
    target size (at most ``max_ups`` times; at least once), then resized to exactly (H, W) and a 3x3 conv to the
    output: the decoder of the dense pretext tasks (context encoder, denoising autoencoder; Pathak et al. 2016
    decode with up-convolutions the same way). Unused upsampling blocks of a small target take no part.
    """

    def __init__(self, in_channels: int, out_channels: int, *, hidden: int = 64, max_ups: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            )
            for i in range(max_ups)
        )
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        for i, block in enumerate(self.blocks):
            if i > 0 and x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
                break
            x = block(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


# --------------------------------------------------------------------------------------------- EMA teacher
def make_teacher(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` (no parameter requires grad), to be updated by :func:`ema_update`."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter; buffers are copied.

    BatchNorm running statistics follow the student directly (they are estimates, not learned weights).
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    for t, s in zip(t_params, s_params):
        t.lerp_(s.detach(), 1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: tau = final - (final - base) * (cos(pi * step / total) + 1) / 2, base at 0, final at end."""
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMATeacher(nn.Module):
    """Holds the teacher copy of a student module and updates it with the cosine momentum schedule.

    ``teacher = EMATeacher(student, base_momentum=0.99)``; after each optimizer step call
    ``teacher.update(student, step, total_steps)``; ``teacher(x)`` runs the copy without gradients.
    """

    def __init__(self, student: nn.Module, *, base_momentum: float = 0.99, final_momentum: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}")
        self.module = make_teacher(student)
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.momentum = base_momentum

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        """EMA step with the scheduled momentum for ``step`` (the step just taken); returns that momentum."""
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum, self.final_momentum)
        ema_update(self.module, student, self.momentum)
        return self.momentum

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
