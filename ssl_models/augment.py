"""View recipes on whole batches: a uint8 batch in (on any device), the list of view batches a method trains on.

``build_views(recipe, *, image_size, channels, grey="skip", **strengths)`` returns a :class:`ViewMaker`;
``views(images, generator)`` maps ``images`` (uint8 B x C x H x W, on the training device) to
``[view (float32 B x C' x S x S), ...]``, normalised, on ``images.device``, in the order methods expect:

* ``simclr``    two views from one distribution: random resized crop, flip, colour jitter, grayscale, blur
                (Chen et al. 2020, SimCLR appendix A);
* ``byol``      BYOL's asymmetric pair: blur p=1.0 / 0.1, solarize p=0.0 / 0.2 (Grill et al. 2020, table 6);
* ``multicrop`` 2 global crops then ``n_local`` small local crops (SwAV; DINO's blur/solarize per crop);
* ``mim``       masked image modeling: crop + flip only (MAE, SimMIM).

Every parameter is drawn per sample on the CPU from ``generator`` (:func:`view_generator` seeds it from
(seed, epoch, step, rank)), then moved to the device, so CPU and CUDA runs draw the same views and a resumed run
draws the ones it would have drawn. The distributions are torchvision v2's (the per-image path this replaces):

* geometry, one ``affine_grid`` + ``grid_sample`` (bilinear) per view: the random resized crop (torchvision's
  rule: 10 tries of a uniform area share and a log-uniform aspect ratio, integer boxes, else the centre crop),
  then the affine (rotation uniform in +-degrees about the centre, shift uniform in +-translate x side), then the
  flip, composed into one matrix per sample. Where the matrix shrinks the image (a large crop to a small local
  view) each output pixel averages k x k bilinear samples over its footprint (k = the largest shrink factor in the
  batch, rounded up, at most 4): torchvision's antialiased resize does the same with a triangle filter. Unlike
  torchvision, rotated/shifted views sample the image around the crop (black only outside the image), and shifts
  are not rounded to whole pixels;
* colour jitter with probability ``jitter_prob``: brightness, contrast, saturation, hue factors uniform as in
  torchvision, applied in a random order per sample (each op runs once per batch position on the samples whose
  permutation puts it there); values are clamped to [0, 1] after each op as torchvision does on uint8 (which also
  rounds: here values stay float);
* grayscale (ITU-R 601 weights), Gaussian blur with a per-sample sigma (a depthwise convolution, one kernel per
  sample, reflect padding, kernel side :func:`blur_kernel_size`), solarize (values >= 128/255 inverted),
  normalisation.

The ops are plain vectorised torch rather than kornia.augmentation: on the CPU kornia was as fast or slower on
every op measured, and its colour jitter draws one order per batch (``python -m bench.augment_ops``,
BENCHMARKS.md "Batched augmentation ops").

Recipes are typed: one frozen dataclass per recipe (:data:`RECIPES`), its fields the strengths and their defaults;
:func:`make_recipe` refuses an unknown key (TypeError naming it) and a bad value (ValueError naming the key).
Grey inputs (``channels=1``): ``grey="skip"`` keeps one channel and drops the colour operations that mean nothing
there (saturation, hue, grayscale); ``grey="expand"`` repeats the channel to RGB first and applies the full recipe
(the backbone then has 3 input channels: see ``.out_channels``). An input whose channel count differs from
``channels`` is converted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

GREY_MODES = ("skip", "expand")
# ImageNet statistics; the grey default is their channel mean (a dataset's own stats can be passed as mean/std)
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_SOLARIZE_THRESHOLD = 128 / 255
_MAX_SUPERSAMPLING = 4


def blur_kernel_size(image_size: int) -> int:
    """SimCLR blurs with a kernel of 10% of the image side; odd, at least 3."""
    k = max(3, round(0.1 * image_size))
    return k if k % 2 else k + 1


def view_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator that draws the views of one batch: a function of (seed, epoch, step, rank) alone, so a
    resumed run redraws the same views and DDP ranks draw different ones (sha256 of the tuple -> 63-bit seed)."""
    digest = hashlib.sha256(f"sslcook-views:{int(seed)}:{int(epoch)}:{int(step)}:{int(rank)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


# ------------------------------------------------------------------------------------------------- recipes
def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"augment: {key} must be a number, got {value!r}")
    return float(value)


def _probability(key: str, value: Any) -> float:
    p = _number(key, value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augment: {key} must be a probability in [0.0, 1.0], got {value!r}")
    return p


def _range(key: str, value: Any, upper: float | None) -> tuple[float, float]:
    """A (lo, hi) option: 0 < lo <= hi, and hi <= the bound (crop scales are shares of the image's area)."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if ok:
        lo, hi = value
        ok = 0 < lo <= hi and (upper is None or hi <= upper)
    if not ok:
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"augment: {key} must be [lo, hi] with 0 < lo <= hi{bound}, got {value!r}")
    return float(value[0]), float(value[1])


def _probabilities(key: str, value: Any, n: int) -> tuple[float, ...]:
    ok = isinstance(value, (list, tuple)) and len(value) == n
    if ok:
        try:
            return tuple(_probability(key, v) for v in value)
        except ValueError:
            pass
    raise ValueError(f"augment: {key} needs {n} probabilities in [0, 1], got {value!r}")


def _stats(key: str, value: Any, positive: bool) -> tuple[float, ...] | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) in (1, 3)
    values = tuple(_number(key, v) for v in value) if ok else ()
    if not ok or (positive and min(values) <= 0):
        raise ValueError(f"augment: {key} must be 1 or 3 numbers{' > 0' if positive else ''}, got {value!r}")
    return values


@dataclass(frozen=True)
class Recipe:
    """Strengths every recipe takes. ``mean``/``std`` None: ImageNet's (their channel mean for grey)."""

    name: ClassVar[str] = ""
    colour: ClassVar[bool] = False  # has the photometric fields (jitter, grayscale, blur, solarize)

    flip_prob: float = 0.5  # 0 for digits (not mirror-symmetric)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    affine_degrees: float = 0.0  # 0: off; a small rotation and shift suit digits
    affine_translate: float = 0.0  # share of the side
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        checked = {
            "flip_prob": _probability("flip_prob", self.flip_prob),
            "crop_ratio": _range("crop_ratio", self.crop_ratio, None),
            "affine_degrees": _number("affine_degrees", self.affine_degrees),
            "affine_translate": _number("affine_translate", self.affine_translate),
            "mean": _stats("mean", self.mean, False),
            "std": _stats("std", self.std, True),
        }
        if checked["affine_degrees"] < 0:
            raise ValueError(f"augment: affine_degrees must be non negative, got {self.affine_degrees!r}")
        if not 0.0 <= checked["affine_translate"] <= 1.0:
            raise ValueError(f"augment: affine_translate must be in [0.0, 1.0], got {self.affine_translate!r}")
        self._set(checked)

    def _set(self, values: dict[str, Any]) -> None:
        for key, value in values.items():  # normalised (YAML lists -> tuples, ints -> floats): hashable, JSON-able
            object.__setattr__(self, key, value)

    def view_specs(self, image_size: int) -> list[tuple[int, tuple[float, float], float, float]]:
        """Per view: (output side, crop scale, blur probability, solarize probability)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ColourRecipe(Recipe):
    """Photometric strengths: ColorJitter(brightness, contrast, saturation, hue) with probability ``jitter_prob``,
    RandomGrayscale(``grayscale_prob``), Gaussian blur sigma range. ``make_recipe(..., jitter_strength=s)`` is
    SimCLR's shorthand: brightness = contrast = saturation = 0.8 s, hue = 0.2 s (for the ones not given;
    SimCLR's CIFAR s = 0.5)."""

    colour: ClassVar[bool] = True

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        checked: dict[str, Any] = {}
        for key in ("brightness", "contrast", "saturation"):
            checked[key] = _number(key, getattr(self, key))
            if checked[key] < 0:
                raise ValueError(
                    f"augment: {key}: if {key} is a single number, it must be non negative, got {getattr(self, key)!r}"
                )
        checked["hue"] = _number("hue", self.hue)
        if not 0.0 <= checked["hue"] <= 0.5:
            raise ValueError(f"augment: hue must be in [0, 0.5], got {self.hue!r}")
        checked["jitter_prob"] = _probability("jitter_prob", self.jitter_prob)
        checked["grayscale_prob"] = _probability("grayscale_prob", self.grayscale_prob)
        checked["blur_sigma"] = _range("blur_sigma", self.blur_sigma, None)
        self._set(checked)


@dataclass(frozen=True)
class SimCLRRecipe(ColourRecipe):
    """Two views from one distribution (SimCLR appendix A)."""

    name: ClassVar[str] = "simclr"
    saturation: float = 0.4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    blur_prob: float = 0.5
    solarize_prob: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(
            {
                "crop_scale": _range("crop_scale", self.crop_scale, 1.0),
                "blur_prob": _probability("blur_prob", self.blur_prob),
                "solarize_prob": _probability("solarize_prob", self.solarize_prob),
            }
        )

    def view_specs(self, image_size):
        return [(image_size, self.crop_scale, self.blur_prob, self.solarize_prob)] * 2


@dataclass(frozen=True)
class BYOLRecipe(ColourRecipe):
    """BYOL's asymmetric pair: blur and solarize probabilities per view (Grill et al. 2020, table 6)."""

    name: ClassVar[str] = "byol"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    blur_probs: tuple[float, float] = (1.0, 0.1)
    solarize_probs: tuple[float, float] = (0.0, 0.2)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(
            {
                "crop_scale": _range("crop_scale", self.crop_scale, 1.0),
                "blur_probs": _probabilities("blur_probs", self.blur_probs, 2),
                "solarize_probs": _probabilities("solarize_probs", self.solarize_probs, 2),
            }
        )

    def view_specs(self, image_size):
        return [(image_size, self.crop_scale, self.blur_probs[i], self.solarize_probs[i]) for i in range(2)]


@dataclass(frozen=True)
class MultiCropRecipe(ColourRecipe):
    """2 global crops, then ``n_local`` local crops of ``local_size`` (None: 3/7 of image_size, as 96/224);
    blur/solarize probabilities: (global 1, global 2, locals), DINO's."""

    name: ClassVar[str] = "multicrop"
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    n_local: int = 6
    local_size: int | None = None
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_probs: tuple[float, float, float] = (0.0, 0.2, 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        n_local, local_size = self.n_local, self.local_size
        if (
            isinstance(n_local, bool)
            or not isinstance(n_local, int)
            or n_local < 0
            or (
                local_size is not None
                and (isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 2)
            )
        ):
            raise ValueError(f"augment multicrop: need n_local >= 0 and local_size >= 2 ({n_local}, {local_size})")
        self._set(
            {
                "global_scale": _range("global_scale", self.global_scale, 1.0),
                "local_scale": _range("local_scale", self.local_scale, 1.0),
                "blur_probs": _probabilities("blur_probs", self.blur_probs, 3),
                "solarize_probs": _probabilities("solarize_probs", self.solarize_probs, 3),
            }
        )

    def view_specs(self, image_size):
        local = self.local_size or max(2, round(image_size * 96 / 224))
        return [(image_size, self.global_scale, self.blur_probs[i], self.solarize_probs[i]) for i in range(2)] + [
            (local, self.local_scale, self.blur_probs[2], self.solarize_probs[2])
        ] * self.n_local


@dataclass(frozen=True)
class MIMRecipe(Recipe):
    """Masked image modeling: one view, crop + flip (+ the optional affine) only (MAE, SimMIM)."""

    name: ClassVar[str] = "mim"
    crop_scale: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set({"crop_scale": _range("crop_scale", self.crop_scale, 1.0)})

    def view_specs(self, image_size):
        return [(image_size, self.crop_scale, 0.0, 0.0)]


RECIPES: dict[str, type[Recipe]] = {c.name: c for c in (SimCLRRecipe, BYOLRecipe, MultiCropRecipe, MIMRecipe)}


def make_recipe(name: str, **strengths: Any) -> Recipe:
    """The recipe ``name`` with ``strengths`` replacing its defaults (unknown key: TypeError naming it)."""
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; one of {', '.join(RECIPES)}")
    cls = RECIPES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    shorthand = {"jitter_strength"} if cls.colour else set()
    unknown = sorted(set(strengths) - known - shorthand)
    if unknown:
        raise TypeError(
            f"augment recipe {name}: unknown option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known | shorthand))})"
        )
    s = dict(strengths)
    if "jitter_strength" in s:
        js = _number("jitter_strength", s.pop("jitter_strength"))
        if js < 0:
            raise ValueError(f"augment: jitter_strength must be non negative, got {js!r}")
        for key, share in (("brightness", 0.8), ("contrast", 0.8), ("saturation", 0.8), ("hue", 0.2)):
            s.setdefault(key, share * js)
    return cls(**s)


# --------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ViewParams:
    """The per-sample parameters of one view batch (CPU tensors, first dimension the batch)."""

    box: Tensor  # B x 4 float: crop top, left, height, width in input pixels (integers, as torchvision)
    angle: Tensor  # B: rotation in degrees
    shift: Tensor  # B x 2: (x, y) shift as a share of the view side
    flip: Tensor  # B bool
    jitter: Tensor  # B bool: colour jitter applied
    factors: Tensor  # B x 4: brightness, contrast, saturation factors, hue shift
    order: Tensor  # B x 4 int64: per-sample permutation of the jitter ops (0 b, 1 c, 2 s, 3 h)
    grayscale: Tensor  # B bool
    blur: Tensor  # B bool
    sigma: Tensor  # B: blur sigma
    solarize: Tensor  # B bool


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g, dtype=torch.float64) * (hi - lo) + lo


def _crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> Tensor:
    """torchvision's RandomResizedCrop rule, vectorised: 10 tries of (area share, log aspect ratio), the first
    box that fits wins, else the centre crop of the closest allowed ratio; integer boxes (top, left, h, w)."""
    area = height * width
    target = area * _uniform(n, scale[0], scale[1], g, 10)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, 10))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # the first True (0 if none)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[:, 1] * (width - w + 1)).clamp(max=width - w)
    found = fits.any(dim=1)
    if not bool(found.all()):
        in_ratio = width / height
        if in_ratio < min(ratio):
            fw, fh = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            fw, fh = round(height * max(ratio)), height
        else:
            fw, fh = width, height
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64)
        box = torch.stack([top, left, h, w], dim=1)
        return torch.where(found[:, None], box, fallback).float()
    return torch.stack([top, left, h, w], dim=1).float()


# ------------------------------------------------------------------------------------------------- pixels
def _grey(x: Tensor) -> Tensor:
    """B x 1 x H x W luma of B x C x H x W (C = 1: itself)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GREY_WEIGHTS[0] * r + _GREY_WEIGHTS[1] * g + _GREY_WEIGHTS[2] * b).unsqueeze(1)


def _match_channels(x: Tensor, channels: int) -> Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 3 and c == 1:
        return x.expand(-1, 3, -1, -1)
    if channels == 1 and c in (3, 4):
        return _grey(x[:, :3])
    if channels == 3 and c == 4:
        return x[:, :3]
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def _to_float(images: Tensor, channels: int) -> Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"views expect uint8 B x C x H x W images, got {images.dtype} {tuple(images.shape)}")
    return _match_channels(images.to(torch.float32).div_(255), channels)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB ``x`` (B x 3 x H x W in [0, 1]) by ``shift`` (B, in turns), through HSV.

    Value v = max and chroma c = max - min do not change; hue (in sixths) is 2 m + (the other two channels'
    difference) / c for the max channel m (R first on ties, as torchvision). Back to RGB: channel n (R 5, G 3,
    B 1) is v - c * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 hue) mod 6 (grey pixels: c = 0, unchanged)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = torch.maximum(torch.maximum(r, g), b)  # elementwise: reductions with indices over C are slow on CPU
    c = v - torch.minimum(torch.minimum(r, g), b)
    is_r = r == v
    is_g = (g == v) & ~is_r
    # (channel-broadcast ops are slow on CPU here: each step stays on B x 1 x H x W, one output channel at a time)
    diff = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(c, alpha=2), (r - g).add_(c, alpha=4)))
    h6 = diff.div_(c.clamp(min=1e-12)).add_(6 * shift.view(-1, 1, 1, 1))
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = h6 + n
        k = k.sub_(torch.floor(k * (1 / 6)).mul_(6))  # mod 6 (torch.remainder is slower)
        out[:, channel : channel + 1] = v - c * torch.minimum(k, 4 - k).clamp_(0, 1)
    return out


def _jitter_op(op: int, x: Tensor, f: Tensor) -> Tensor:
    f4 = f.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * f4).clamp_(0, 1)
    if op == 1:  # contrast: blend with the mean grey level (the weighted channel means)
        means = x.mean(dim=(2, 3))
        grey = means if x.shape[1] == 1 else means @ torch.tensor(_GREY_WEIGHTS, device=x.device)[:, None]
        grey = grey.view(-1, 1, 1, 1)
        return (x - grey).mul_(f4).add_(grey).clamp_(0, 1)
    if op == 2:  # saturation: blend with the grey image
        grey = _grey(x)
        return (x - grey).mul_(f4).add_(grey).clamp_(0, 1)
    return _adjust_hue(x, f)


def _gaussian_kernels(sigma: Tensor, k: int) -> Tensor:
    """n x k normalised 1-D Gaussian kernels, one per sigma (torchvision's GaussianBlur kernel)."""
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=sigma.dtype, device=sigma.device)
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def _blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample: a depthwise convolution, one kernel per (sample,
    channel), reflect padding."""
    n, c, h, w = x.shape
    kernel = _gaussian_kernels(sigma, k).repeat_interleave(c, dim=0)  # (n c) x k
    flat = F.pad(x.reshape(1, n * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, k), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, k, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _apply_to(x: Tensor, chosen: Tensor, fn) -> Tensor:
    """``fn`` on the samples where the CPU mask ``chosen`` is True (all, some or none); ``x`` is a view batch
    the caller owns, overwritten in place for a subset."""
    if not bool(chosen.any()):
        return x
    if bool(chosen.all()):
        return fn(x, slice(None))
    idx = chosen.nonzero()[:, 0]
    dev_idx = idx.to(x.device, non_blocking=True)
    x[dev_idx] = fn(x[dev_idx], idx)
    return x


# ----------------------------------------------------------------------------------------------- the maker
class ViewMaker:
    """The callable :func:`build_views` returns; ``sample_params`` exposes the per-sample draws."""

    def __init__(self, recipe: Recipe, *, image_size: int, channels: int, grey: str = "skip") -> None:
        self.spec = recipe
        self.recipe = recipe.name
        self.image_size = image_size
        self.work_channels = 3 if (channels == 3 or grey == "expand") else 1
        self.out_channels = self.work_channels
        colour = self.work_channels == 3
        self.views = recipe.view_specs(image_size)
        self.sizes = [size for size, *_ in self.views]
        self.colour = recipe.colour
        if recipe.colour:  # the colour-only ops mean nothing on one channel (grey="skip")
            strengths = (
                recipe.brightness,
                recipe.contrast,
                recipe.saturation if colour else 0.0,
                recipe.hue if colour else 0.0,
            )
            self.jitter_ops = [op for op in range(4) if strengths[op] > 0]
            self.jitter_strengths = strengths
            self.grayscale_prob = recipe.grayscale_prob if colour else 0.0
        mean = recipe.mean or (RGB_MEAN if colour else GREY_MEAN)
        std = recipe.std or (RGB_STD if colour else GREY_STD)
        if len(mean) == 1 and colour:
            mean, std = mean * 3, std * 3
        if len(mean) != self.work_channels or len(std) != self.work_channels:
            raise ValueError(f"augment: mean/std need {self.work_channels} value(s), got {mean}, {std}")
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        fields = {f.name: _jsonable(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)}
        fields.update(mean=list(mean), std=list(std))  # the statistics used, so export normalises the same way
        self.config = {"recipe": recipe.name, "image_size": image_size, "channels": channels, "grey": grey, **fields}

    @property
    def num_views(self) -> int:
        return len(self.views)

    # -- parameters
    def sample_params(self, batch: int, height: int, width: int, generator: torch.Generator) -> list[ViewParams]:
        """Every view's per-sample parameters for a batch of ``batch`` images of ``height`` x ``width``, drawn on
        the CPU from ``generator``: the same draws whichever ops are switched off (only their use changes)."""
        r = self.spec
        out = []
        for _size, scale, blur_p, solarize_p in self.views:
            box = _crop_boxes(batch, height, width, scale, r.crop_ratio, generator)
            geo = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
            angle = (geo[:, 0] * 2 - 1) * r.affine_degrees
            shift = (geo[:, 1:3] * 2 - 1) * r.affine_translate
            flip = geo[:, 3] < r.flip_prob
            photo = torch.rand(batch, 9, generator=generator, dtype=torch.float64)
            order = torch.rand(batch, 4, generator=generator).argsort(dim=1)
            if r.colour:
                b, c, s, h = self.jitter_strengths
                factors = torch.stack(
                    [
                        _factor(photo[:, 1], b),
                        _factor(photo[:, 2], c),
                        _factor(photo[:, 3], s),
                        (photo[:, 4] * 2 - 1) * h,
                    ],
                    dim=1,
                )
                jitter = photo[:, 0] < (r.jitter_prob if self.jitter_ops else 0.0)
                grayscale = photo[:, 5] < self.grayscale_prob
                sigma = photo[:, 6] * (r.blur_sigma[1] - r.blur_sigma[0]) + r.blur_sigma[0]
            else:
                factors = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64).expand(batch, 4)
                jitter = grayscale = torch.zeros(batch, dtype=torch.bool)
                sigma = torch.ones(batch, dtype=torch.float64)
            out.append(
                ViewParams(
                    box=box,
                    angle=angle.float(),
                    shift=shift.float(),
                    flip=flip,
                    jitter=jitter,
                    factors=factors.float(),
                    order=order,
                    grayscale=grayscale,
                    blur=photo[:, 7] < blur_p,
                    sigma=sigma.float(),
                    solarize=photo[:, 8] < solarize_p,
                )
            )
        return out

    # -- pixels
    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """The views of a uint8 batch (B x C x H x W; one C x H x W image gives unbatched views). ``generator``
        (CPU) draws the parameters; None: torch's global generator (``torch.manual_seed``)."""
        if images.ndim == 3:
            return [v[0] for v in self(images.unsqueeze(0), generator)]
        x = _to_float(images, self.work_channels)
        generator = generator if generator is not None else torch.default_generator
        params = self.sample_params(x.shape[0], x.shape[2], x.shape[3], generator)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return [
            self._view(x, p, size, blur_p > 0).sub_(mean).div_(std)
            for p, (size, _, blur_p, _) in zip(params, self.views)
        ]

    def _view(self, x: Tensor, p: ViewParams, size: int, blur_on: bool) -> Tensor:
        v = self._geometry(x, p, size)
        if self.colour:
            v = self._jitter(v, p)
            if self.grayscale_prob > 0:
                v = _apply_to(v, p.grayscale, lambda y, i: _grey(y).repeat(1, 3, 1, 1))
            if blur_on:
                sigma, k = p.sigma.to(v.device, non_blocking=True), blur_kernel_size(size)
                v = _apply_to(v, p.blur, lambda y, i: _blur(y, sigma[i], k))
        v = _apply_to(v, p.solarize, lambda y, i: torch.where(y >= _SOLARIZE_THRESHOLD, 1 - y, y))
        return v.contiguous()

    def _jitter(self, v: Tensor, p: ViewParams) -> Tensor:
        """Colour jitter in each sample's own order: at each of the 4 positions, each op runs once on the
        samples whose permutation puts it there."""
        factors = p.factors.to(v.device, non_blocking=True)
        for position in range(4):
            for op in self.jitter_ops:
                chosen = p.jitter & (p.order[:, position] == op)
                v = _apply_to(v, chosen, lambda y, i, op=op: _jitter_op(op, y, factors[i, op]))
        return v

    def _geometry(self, x: Tensor, p: ViewParams, size: int) -> Tensor:
        """Crop, affine and flip as one sampling matrix per sample (output coords -> input coords, both in
        grid_sample's [-1, 1] units): input = D R (F q - t) + c with F the flip, R the rotation, t the shift,
        D and c the crop box's half-extent and centre."""
        n, _, height, width = x.shape
        top, left, h, w = p.box.unbind(1)
        a = torch.deg2rad(-p.angle)  # torchvision's sign: a positive angle turns the image counter-clockwise
        cos, sin = torch.cos(a), torch.sin(a)
        f = torch.where(p.flip, -1.0, 1.0)
        dx, dy = w / width, h / height
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = dx * cos * f, -dx * sin
        theta[:, 1, 0], theta[:, 1, 1] = dy * sin * f, dy * cos
        tx, ty = 2 * p.shift[:, 0], 2 * p.shift[:, 1]
        theta[:, 0, 2] = (2 * left + w) / width - 1 - dx * (cos * tx - sin * ty)
        theta[:, 1, 2] = (2 * top + h) / height - 1 - dy * (sin * tx + cos * ty)
        shrink = float(torch.maximum(h, w).max()) / size
        k = min(_MAX_SUPERSAMPLING, max(1, math.ceil(shrink - 1e-6)))
        grid = F.affine_grid(
            theta.to(x.device, non_blocking=True), [n, x.shape[1], size * k, size * k], align_corners=False
        )
        # border padding: bilinear taps past the outer pixel centres repeat the edge (as a resize does); what
        # the rotation or shift brings in from outside the image is black (torchvision's fill)
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.spec.affine_degrees or self.spec.affine_translate:
            v = v * (grid.abs() <= 1).all(dim=-1).unsqueeze(1)
        return F.avg_pool2d(v, k) if k > 1 else v

    def __repr__(self) -> str:
        return f"ViewMaker({self.recipe!r}, views={self.num_views}, sizes={self.sizes}, channels={self.out_channels})"


def _factor(u: Tensor, strength: float) -> Tensor:
    """torchvision's jitter factor: uniform in [max(0, 1 - s), 1 + s]."""
    lo = max(0.0, 1 - strength)
    return u * (1 + strength - lo) + lo


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def build_views(
    recipe: str | Recipe, *, image_size: int, channels: int, grey: str = "skip", **strengths: Any
) -> ViewMaker:
    """The view maker of a recipe (see the module docstring and the recipe dataclasses for the strengths and
    their defaults); ``strengths`` override the recipe's."""
    if channels not in (1, 3):
        raise ValueError(f"augment: channels must be 1 or 3, got {channels}")
    if grey not in GREY_MODES:
        raise ValueError(f"augment: grey must be one of {', '.join(GREY_MODES)}, got {grey!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
        raise ValueError(f"augment: image_size must be an integer >= 2, got {image_size!r}")
    if isinstance(recipe, Recipe):
        recipe = dataclasses.replace(recipe, **strengths) if strengths else recipe
    else:
        recipe = make_recipe(recipe, **strengths)
    return ViewMaker(recipe, image_size=image_size, channels=channels, grey=grey)


class EvalTransform:
    """Deterministic preprocessing for evaluation/export: channel match, resize to ``image_size`` (bilinear,
    antialiased), normalise. Works on one uint8 image (C x H x W) or a batch (B x C x H x W), with the same
    mean/std as training."""

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        grey: str = "skip",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        work_channels = 3 if (channels == 3 or grey == "expand") else 1
        mean = tuple(mean) if mean is not None else (RGB_MEAN if work_channels == 3 else GREY_MEAN)
        std = tuple(std) if std is not None else (RGB_STD if work_channels == 3 else GREY_STD)
        if len(mean) == 1 and work_channels == 3:
            mean, std = mean * 3, std * 3
        self.out_channels = work_channels
        self.image_size = image_size
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim == 3:
            return self(images.unsqueeze(0))[0]
        x = _to_float(images, self.out_channels)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def build_eval_transform(*, image_size: int, channels: int, grey: str = "skip", mean=None, std=None) -> EvalTransform:
    return EvalTransform(image_size=image_size, channels=channels, grey=grey, mean=mean, std=std)
