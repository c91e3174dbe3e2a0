"""The per-sample view path (torchvision.transforms.v2, one image at a time), kept as a benchmark baseline.

This is ``ssl_models/augment.py`` as it was before views were made per batch on the training device (commit
fcfb727), trimmed to the view recipes: ``build_views(recipe, *, image_size, channels, grey="skip", **strengths)``
returns a callable ``img (uint8 C x H x W) -> [view (float C' x S x S), ...]``, normalised, views in the order
the methods expect. The project trains through the batched path (``ssl_models.augment``); ``bench.datapath``,
``bench.e2e`` and ``bench.gpu`` time this one beside it, in loader workers as the project used to run it.

Recipes: ``simclr`` (crop, flip, colour jitter, grayscale, blur), ``byol`` (blur p=1.0 / 0.1, solarize p=0 / 0.2),
``multicrop`` (2 global + ``n_local`` local crops), ``mim`` (crop + flip). Grey inputs: ``grey="skip"`` keeps one
channel and drops saturation, hue and grayscale; ``"expand"`` repeats the channel to RGB first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

RECIPES = ("simclr", "byol", "multicrop", "mim")
GREY_MODES = ("skip", "expand")
# ImageNet statistics; the grey default is their channel mean (a dataset's own stats can be passed as mean/std)
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)

_COMMON = {"mean", "std", "flip_prob", "crop_ratio", "affine_degrees", "affine_translate"}
_COLOUR = {
    "jitter_strength",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "jitter_prob",
    "grayscale_prob",
    "blur_sigma",
}
_ALLOWED = {
    "simclr": _COMMON | _COLOUR | {"crop_scale", "blur_prob", "solarize_prob"},
    "byol": _COMMON | _COLOUR | {"crop_scale", "blur_probs", "solarize_probs"},
    "multicrop": _COMMON
    | _COLOUR
    | {"global_scale", "local_scale", "n_local", "local_size", "blur_probs", "solarize_probs"},
    "mim": _COMMON | {"crop_scale"},
}


def blur_kernel_size(image_size: int) -> int:
    """SimCLR blurs with a kernel of 10% of the image side; odd, at least 3."""
    k = max(3, round(0.1 * image_size))
    return k if k % 2 else k + 1


class _MatchChannels(torch.nn.Module):
    """Bring an input to the channel count the recipe works in (grey <-> RGB)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, img: Tensor) -> Tensor:
        c = img.shape[-3]
        if c == self.channels:
            return img
        if self.channels == 3 and c == 1:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).contiguous()
        if self.channels == 1 and c in (3, 4):
            return v2.functional.rgb_to_grayscale(img[..., :3, :, :])
        if self.channels == 3 and c == 4:
            return img[..., :3, :, :]
        raise ValueError(f"cannot convert a {c}-channel image to {self.channels} channels")


class MultiView:
    """The callable :func:`build_views` returns: one pipeline per view, applied to the same input image."""

    def __init__(
        self,
        recipe: str,
        pipelines: Sequence[v2.Transform],
        out_channels: int,
        sizes: Sequence[int],
        config: dict[str, Any],
        threads: int = 1,
    ) -> None:
        self.recipe = recipe
        self.threads = threads
        self.pipelines = list(pipelines)
        self.out_channels = out_channels
        self.sizes = list(sizes)
        self.config = config

    @property
    def num_views(self) -> int:
        return len(self.pipelines)

    def __call__(self, img: Tensor) -> list[Tensor]:
        if img.dtype != torch.uint8 or img.ndim != 3:
            raise ValueError(f"views expect a uint8 C x H x W image, got {img.dtype} {tuple(img.shape)}")
        previous = torch.get_num_threads()
        if previous <= self.threads:
            return [p(img) for p in self.pipelines]
        # One image is far too little work for a parallel region: affine warps, hue and blur spend more on
        # OpenMP synchronisation than on pixels (measured 15-25x slower with 2 threads on 2 busy cores). The
        # setting is process-wide, so it is restored before returning (the caller's training step is unaffected).
        torch.set_num_threads(self.threads)
        try:
            return [p(img) for p in self.pipelines]
        finally:
            torch.set_num_threads(previous)

    def __repr__(self) -> str:
        return f"MultiView({self.recipe!r}, views={self.num_views}, sizes={self.sizes}, channels={self.out_channels})"


def build_views(
    recipe: str, *, image_size: int, channels: int, grey: str = "skip", threads: int = 1, **strengths: Any
) -> MultiView:
    """The view generator of a recipe (see the module docstring); ``strengths`` override the recipe defaults.

    Common: mean, std, flip_prob (0.5; 0 for digits), crop_ratio ((3/4, 4/3)), affine_degrees and
    affine_translate (0: off; a small RandomAffine suits digits).
    Colour (simclr, byol, multicrop): jitter_strength s (brightness = contrast = saturation = 0.8 s,
    hue = 0.2 s; SimCLR's CIFAR s = 0.5) or brightness/contrast/saturation/hue directly, jitter_prob (0.8),
    grayscale_prob (0.2), blur_sigma ((0.1, 2.0)).
    simclr: crop_scale ((0.08, 1)), blur_prob (0.5), solarize_prob (0).
    byol: crop_scale ((0.08, 1)), blur_probs ((1.0, 0.1)), solarize_probs ((0.0, 0.2)); jitter defaults
    (0.4, 0.4, 0.2, 0.1).
    multicrop: global_scale ((0.4, 1)), local_scale ((0.05, 0.4)), n_local (6), local_size (3/7 of image_size,
    as 96/224), blur_probs ((1.0, 0.1, 0.5): global 1, global 2, locals), solarize_probs ((0, 0.2, 0)).
    mim: crop_scale ((0.2, 1)).
    threads: torch CPU threads while transforming one image (1: see MultiView.__call__).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; one of {', '.join(RECIPES)}")
    if channels not in (1, 3):
        raise ValueError(f"augment: channels must be 1 or 3, got {channels}")
    if grey not in GREY_MODES:
        raise ValueError(f"augment: grey must be one of {', '.join(GREY_MODES)}, got {grey!r}")
    if image_size < 2:
        raise ValueError(f"augment: image_size must be >= 2, got {image_size}")
    unknown = sorted(set(strengths) - _ALLOWED[recipe])
    if unknown:
        raise ValueError(f"augment recipe {recipe}: unknown option(s) {', '.join(unknown)}")
    for key, upper in _RANGES.items():  # torchvision only warns on these, or fails on the first image
        if key in strengths:
            _check_range(key, strengths[key], upper)

    work_channels = 3 if (channels == 3 or grey == "expand") else 1
    s = dict(strengths)
    colour = work_channels == 3
    mean = tuple(s.pop("mean", RGB_MEAN if work_channels == 3 else GREY_MEAN))
    std = tuple(s.pop("std", RGB_STD if work_channels == 3 else GREY_STD))
    if len(mean) == 1 and work_channels == 3:
        mean, std = mean * 3, std * 3
    if len(mean) != work_channels or len(std) != work_channels:
        raise ValueError(f"augment: mean/std need {work_channels} value(s), got {mean}, {std}")
    flip_prob = float(s.pop("flip_prob", 0.5))
    ratio = tuple(s.pop("crop_ratio", (3 / 4, 4 / 3)))
    affine_degrees = float(s.pop("affine_degrees", 0.0))
    affine_translate = float(s.pop("affine_translate", 0.0))

    jitter_default = {
        "simclr": (0.4, 0.4, 0.4, 0.1),
        "byol": (0.4, 0.4, 0.2, 0.1),
        "multicrop": (0.4, 0.4, 0.2, 0.1),
    }.get(recipe, (0, 0, 0, 0))
    if "jitter_strength" in s:
        js = float(s.pop("jitter_strength"))
        jitter_default = (0.8 * js, 0.8 * js, 0.8 * js, 0.2 * js)
    brightness = float(s.pop("brightness", jitter_default[0]))
    contrast = float(s.pop("contrast", jitter_default[1]))
    saturation = float(s.pop("saturation", jitter_default[2])) if colour else 0.0
    hue = float(s.pop("hue", jitter_default[3])) if colour else 0.0
    s.pop("saturation", None), s.pop("hue", None)
    jitter_prob = float(s.pop("jitter_prob", 0.8))
    grayscale_prob = float(s.pop("grayscale_prob", 0.2)) if colour else 0.0
    s.pop("grayscale_prob", None)
    blur_sigma = tuple(s.pop("blur_sigma", (0.1, 2.0)))

    head = [_MatchChannels(work_channels)]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]

    def geometric(size: int, scale: tuple[float, float]) -> list[v2.Transform]:
        ops: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)]
        if affine_degrees or affine_translate:
            ops.append(v2.RandomAffine(degrees=affine_degrees, translate=(affine_translate, affine_translate)))
        if flip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(flip_prob))
        return ops

    def photometric(size: int, blur_p: float, solarize_p: float) -> list[v2.Transform]:
        ops: list[v2.Transform] = []
        if jitter_prob > 0 and any((brightness, contrast, saturation, hue)):
            ops.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob))
        if grayscale_prob > 0:
            ops.append(v2.RandomGrayscale(grayscale_prob))
        if blur_p > 0:
            ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=blur_sigma)], p=blur_p))
        if solarize_p > 0:
            ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        return ops

    def pipeline(size: int, scale, blur_p: float = 0.0, solarize_p: float = 0.0, photo: bool = True):
        ops = head + geometric(size, tuple(scale)) + (photometric(size, blur_p, solarize_p) if photo else []) + tail
        return v2.Compose(ops)

    if recipe == "simclr":
        scale = s.pop("crop_scale", (0.08, 1.0))
        blur_p, sol_p = float(s.pop("blur_prob", 0.5)), float(s.pop("solarize_prob", 0.0))
        pipes = [pipeline(image_size, scale, blur_p, sol_p) for _ in range(2)]
        sizes = [image_size] * 2
    elif recipe == "byol":
        scale = s.pop("crop_scale", (0.08, 1.0))
        blur_ps = _pair(s.pop("blur_probs", (1.0, 0.1)), "blur_probs", 2)
        sol_ps = _pair(s.pop("solarize_probs", (0.0, 0.2)), "solarize_probs", 2)
        pipes = [pipeline(image_size, scale, blur_ps[i], sol_ps[i]) for i in range(2)]
        sizes = [image_size] * 2
    elif recipe == "multicrop":
        global_scale = s.pop("global_scale", (0.4, 1.0))
        local_scale = s.pop("local_scale", (0.05, 0.4))
        n_local = int(s.pop("n_local", 6))
        local_size = int(s.pop("local_size", max(2, round(image_size * 96 / 224))))
        if n_local < 0 or local_size < 2:
            raise ValueError(f"augment multicrop: need n_local >= 0 and local_size >= 2 ({n_local}, {local_size})")
        blur_ps = _pair(s.pop("blur_probs", (1.0, 0.1, 0.5)), "blur_probs", 3)
        sol_ps = _pair(s.pop("solarize_probs", (0.0, 0.2, 0.0)), "solarize_probs", 3)
        pipes = [
            pipeline(image_size, global_scale, blur_ps[0], sol_ps[0]),
            pipeline(image_size, global_scale, blur_ps[1], sol_ps[1]),
        ]
        pipes += [pipeline(local_size, local_scale, blur_ps[2], sol_ps[2]) for _ in range(n_local)]
        sizes = [image_size] * 2 + [local_size] * n_local
    else:  # mim
        scale = s.pop("crop_scale", (0.2, 1.0))
        pipes = [pipeline(image_size, scale, photo=False)]
        sizes = [image_size]
    config = {"recipe": recipe, "image_size": image_size, "channels": channels, "grey": grey, **strengths}
    return MultiView(recipe, pipes, work_channels, sizes, config, threads=max(1, int(threads)))


# (lo, hi) options: 0 < lo <= hi, and hi <= the bound (crop scales are shares of the image's area)
_RANGES = {"crop_scale": 1.0, "global_scale": 1.0, "local_scale": 1.0, "crop_ratio": None, "blur_sigma": None}


def _check_range(key: str, value: Any, upper: float | None) -> None:
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


def _pair(values: Any, key: str, n: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != n or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"augment: {key} needs {n} probabilities in [0, 1], got {values}")
    return values
