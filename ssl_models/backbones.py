"""Backbones: torchvision ResNets (with a small-image stem and a width knob) and a plain Vision Transformer.

``build_backbone(name, **kwargs)`` returns a module with

* ``forward(x) -> (B, feature_dim)``: the representation that is exported and evaluated;
* ``feature_dim`` (int) and ``config`` (dict): ``build_backbone(**m.config)`` rebuilds the same architecture.

ResNets keep torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1`` ...; the ``fc`` head is gone),
so a trained backbone loads into ``torchvision.models.resnet18/50`` with ``strict=True`` once that model's ``fc``
is removed (and, for ``small_image=True``, its stem swapped the same way).

ViTs also expose their tokens: ``forward_features(x)`` -> ``{"cls": (B, D), "patch_tokens": (B, N, D)}``, and
the two hooks masked image modeling needs: ``keep_index`` (MAE: the encoder runs on the visible patches only) and
``token_mask`` + ``mask_token`` (SimMIM: masked patches are replaced by a learned token before the encoder).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

RESNET_LAYERS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}
# (embed_dim, depth, num_heads): DeiT's tiny and small presets
VIT_PRESETS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6)}
BACKBONE_NAMES = tuple(RESNET_LAYERS) + tuple(VIT_PRESETS)


# --------------------------------------------------------------------------------------------- ResNet
class ResNetBackbone(ResNet):
    """torchvision's ResNet without its classifier; ``width`` scales every stage (64 = torchvision).

    ``small_image=True`` is the CIFAR stem of SimCLR's appendix: a 3x3 stride-1 first convolution and no max-pool,
    so a 32x32 (or 28x28) input still has a 4x4 map at the last stage instead of 1x1. ``stem_stride=2`` keeps that
    stem but halves the resolution at once: 4x cheaper, a 2x2 last-stage map on 28x28 digits (the CPU default).
    """

    def __init__(
        self,
        name: str = "resnet18",
        *,
        in_chans: int = 3,
        small_image: bool = False,
        width: int = 64,
        stem_stride: int = 1,
        zero_init_residual: bool = False,
    ) -> None:
        if name not in RESNET_LAYERS:
            raise ValueError(f"unknown ResNet {name!r}; one of {sorted(RESNET_LAYERS)}")
        if width < 1 or in_chans < 1:
            raise ValueError(f"{name}: width and in_chans must be >= 1 (got width={width}, in_chans={in_chans})")
        if stem_stride not in (1, 2):
            raise ValueError(f"{name}: stem_stride must be 1 or 2 (got {stem_stride})")
        if stem_stride != 1 and not small_image:
            raise ValueError(f"{name}: stem_stride applies to the small_image stem only")
        block, layers = RESNET_LAYERS[name]
        # torchvision's __init__ hard-codes 64 channels; build the same modules (same attribute names, so the
        # same state-dict keys) with the stage widths scaled, using its own _make_layer.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # Bottleneck's inner width = planes * base_width / 64 = planes, as in torchvision
        self.inplanes = width
        if small_image:
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()  # no parameters: the exported state dict is torchvision's minus fc

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

        self.feature_dim = width * 8 * block.expansion
        self.config: dict[str, Any] = {
            "name": name,
            "in_chans": in_chans,
            "small_image": small_image,
            "width": width,
            "stem_stride": stem_stride,
            "zero_init_residual": zero_init_residual,
        }

    def forward_map(self, x: Tensor) -> Tensor:
        """The last stage's feature map (B, feature_dim, h, w)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.forward_map(x)), 1)


# --------------------------------------------------------------------------------------------- ViT
def sincos_position_embedding(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE, He et al. 2022): (grid_h * grid_w, dim).

    Half the channels encode the row, half the column, each as sin/cos of the position at geometrically spaced
    frequencies (Transformer, Vaswani et al. 2017). Fixed, so any grid (e.g. DINO's local crops) gets one.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine position embedding needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def jepa_init_(module: nn.Module, blocks: nn.ModuleList, std: float = 0.02) -> None:
    """I-JEPA's initialisation (the official code, facebookresearch/ijepa src/models/vision_transformer.py): every
    linear and convolution weight truncated normal with ``std`` (cut at +-2, as there: in effect a normal), zero
    biases, unit LayerNorms, then each block's two output projections (attention, the MLP's second layer) divided
    by sqrt(2 x block number), so that the residual stream grows slowly with depth."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for number, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * number))
            block.mlp[2].weight.div_(math.sqrt(2.0 * number))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) with a class token and fixed sine-cosine positions (as in MAE).

    ``forward(x)`` returns the final-normed class token (``global_pool="cls"``) or the mean of the patch tokens
    (``global_pool="mean"``). Inputs whose size is not ``image_size`` work too (the position embedding is computed
    for their grid), which DINO's local crops need. ``init``: ``"mae"`` (xavier-uniform linears, MAE's) or
    ``"jepa"`` (:func:`jepa_init_`); it is part of the config, so a random-init baseline rebuilt from an exported
    header starts where the method started.
    """

    def __init__(
        self,
        name: str = "vit_tiny",
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        global_pool: str = "cls",
        init: str = "mae",
    ) -> None:
        super().__init__()
        if init not in ("mae", "jepa"):
            raise ValueError(f"{name}: init must be 'mae' or 'jepa', got {init!r}")
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown ViT {name!r}; one of {sorted(VIT_PRESETS)}")
        if patch_size < 1 or image_size < patch_size:
            raise ValueError(f"{name}: need 1 <= patch_size <= image_size (got {patch_size}, {image_size})")
        if global_pool not in ("cls", "mean"):
            raise ValueError(f"{name}: global_pool must be 'cls' or 'mean', got {global_pool!r}")
        preset_dim, preset_depth, preset_heads = VIT_PRESETS[name]
        embed_dim = embed_dim or preset_dim
        depth = depth or preset_depth
        num_heads = num_heads or preset_heads

        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.global_pool = global_pool
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # not persistent: derived from the config, so the exported weights carry only learned tensors
        self.register_buffer("pos_embed", sincos_position_embedding(*self.grid_size, embed_dim)[None], persistent=False)
        self.blocks = nn.ModuleList([TransformerBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.feature_dim = embed_dim
        self.config: dict[str, Any] = {
            "name": name,
            "image_size": image_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "global_pool": global_pool,
            "init": init,
        }
        if init == "mae":
            self._init_weights()
        else:
            jepa_init_(self, self.blocks)
            nn.init.normal_(self.cls_token, std=0.02)

    def _init_weights(self) -> None:
        # MAE's init: patch projection like a linear layer, xavier for linears, small normal for the class token
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimizers should not decay (besides biases and norms)."""
        return {"cls_token"}

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        if (grid_h, grid_w) == self.grid_size:
            return self.pos_embed
        return sincos_position_embedding(grid_h, grid_w, self.embed_dim)[None].to(self.pos_embed)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, patch_size**2 * C), patches in row-major order, pixels (p, p, C) inside."""
        p = self.patch_size
        b, c, h, w = images.shape
        gh, gw = h // p, w // p
        x = images[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)

    def embed_patches(self, images: Tensor) -> Tensor:
        """Patch tokens without position: (B, N, D)."""
        return self.patch_embed(images).flatten(2).transpose(1, 2)

    def forward_features(
        self,
        x: Tensor,
        *,
        keep_index: Tensor | None = None,
        token_mask: Tensor | None = None,
        mask_token: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the encoder; returns ``{"cls": (B, D), "patch_tokens": (B, N', D)}`` after the final norm.

        keep_index  (B, K) long: only these patches enter the encoder (MAE); ``patch_tokens`` has K rows, in
                    ``keep_index`` order.
        token_mask  (B, N) bool, with ``mask_token`` (D,): masked patches are replaced by the mask token before
                    position embeddings are added (SimMIM).
        """
        tokens = self.embed_patches(x)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if token_mask is not None:
            if mask_token is None:
                raise ValueError("token_mask needs a mask_token")
            m = token_mask.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - m) + mask_token.reshape(1, 1, -1).to(tokens.dtype) * m
        tokens = tokens + self.position_embedding(gh, gw)
        if keep_index is not None:
            tokens = torch.gather(tokens, 1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # class token: no position (MAE, DeiT use none/zero)
        h = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return {"cls": h[:, 0], "patch_tokens": h[:, 1:]}

    def forward(self, x: Tensor) -> Tensor:
        feats = self.forward_features(x)
        return feats["cls"] if self.global_pool == "cls" else feats["patch_tokens"].mean(dim=1)


# --------------------------------------------------------------------------------------------- factory
def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by name (resnet18, resnet50, vit_tiny, vit_small).

    ResNet kwargs: in_chans, small_image, width, stem_stride, zero_init_residual.
    ViT kwargs: in_chans, image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, global_pool, init.
    Keys meant for the other family (e.g. ``patch_size`` for a ResNet, ``small_image`` for a ViT) are ignored, so
    one params block can describe either; any other unknown key is an error.
    """
    resnet = {"in_chans", "small_image", "width", "stem_stride", "zero_init_residual"}
    vit = {
        "in_chans",
        "image_size",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "global_pool",
        "init",
    }
    if name in RESNET_LAYERS:
        own, other, cls = resnet, vit - resnet, ResNetBackbone
    elif name in VIT_PRESETS:
        own, other, cls = vit, resnet - vit, VisionTransformer
    else:
        raise ValueError(f"unknown backbone {name!r}; one of {', '.join(BACKBONE_NAMES)}")
    unknown = sorted(set(kwargs) - own - other)
    if unknown:
        raise ValueError(f"backbone {name}: unknown option(s) {', '.join(unknown)}")
    return cls(name, **{k: v for k, v in kwargs.items() if k in own})


def feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's spatial features (B, feature_dim, h, w): a ResNet's last stage, a ViT's patch tokens on
    their grid. Dense pretext tasks (colorization, inpainting, denoising) decode from it."""
    if isinstance(backbone, VisionTransformer):
        tokens = backbone.forward_features(x)["patch_tokens"]
        gh, gw = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], gh, gw)
    if hasattr(backbone, "forward_map"):
        return backbone.forward_map(x)
    raise ValueError(f"{type(backbone).__name__} has no spatial feature map (a ResNet or ViT backbone is needed)")
