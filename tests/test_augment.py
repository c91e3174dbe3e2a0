"""View recipes: view counts and sizes, grey handling, BYOL's asymmetry, MIM's geometry-only views, errors."""
from __future__ import annotations

import pytest
import torch

from ssl_models import build_eval_transform, build_views
from ssl_models.augment import GREY_MEAN, GREY_STD, RGB_MEAN, RGB_STD


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def image(channels=3, size=32, seed=0):
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recipe,count", [("simclr", 2), ("byol", 2), ("mim", 1)])
@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_normalised_float_images(recipe, count, channels):
    views = build_views(recipe, image_size=24, channels=channels)
    out = views(image(channels, 32))
    assert len(out) == count == views.num_views
    for v in out:
        assert v.dtype == torch.float32 and v.shape == (channels, 24, 24)
    assert views.out_channels == channels


def test_multicrop_gives_two_global_then_local_crops(cifar_tensors):
    img = (cifar_tensors[0][0] * 255).round().to(torch.uint8)
    views = build_views("multicrop", image_size=32, channels=3, n_local=4, local_size=12)
    out = views(img)
    assert [tuple(v.shape[-2:]) for v in out] == [(32, 32)] * 2 + [(12, 12)] * 4
    assert views.sizes == [32, 32, 12, 12, 12, 12]
    default = build_views("multicrop", image_size=224, channels=3)
    assert default.sizes == [224, 224] + [96] * 6  # DINO/SwAV's 2 x 224 + local 96 crops


def test_grey_inputs_skip_colour_ops_or_expand():
    grey = image(1, 28)
    skip = build_views("simclr", image_size=28, channels=1, grey="skip")
    ops = " ".join(repr(p) for p in skip.pipelines)
    assert "Grayscale" not in ops and "hue" not in ops and "saturation" not in ops
    assert all(v.shape == (1, 28, 28) for v in skip(grey))
    expand = build_views("simclr", image_size=28, channels=1, grey="expand")
    assert expand.out_channels == 3 and all(v.shape == (3, 28, 28) for v in expand(grey))
    assert "Grayscale" in " ".join(repr(p) for p in expand.pipelines)
    # an RGB image handed to a grey recipe is converted (and vice versa)
    assert skip(image(3, 28))[0].shape == (1, 28, 28)
    assert build_views("mim", image_size=28, channels=3)(grey)[0].shape == (3, 28, 28)


def _normalised(value, channels=3):
    mean, std = (RGB_MEAN, RGB_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    return torch.tensor([(value / 255 - m) / s for m, s in zip(mean, std)])


def test_byol_views_are_asymmetric():
    # a constant image is unchanged by crop, flip and blur: only solarization (200 -> 55) can alter it
    const = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    views = build_views("byol", image_size=16, channels=3, jitter_prob=0.0, grayscale_prob=0.0)
    torch.manual_seed(0)
    solarized = [0, 0]
    for _ in range(60):
        for k, v in enumerate(views(const)):
            pixel = v[:, 0, 0]
            if torch.allclose(pixel, _normalised(55), atol=1e-4):
                solarized[k] += 1
            else:
                assert torch.allclose(pixel, _normalised(200), atol=1e-4)
    assert solarized[0] == 0 and 3 <= solarized[1] <= 24  # p = 0.0 vs 0.2

    # blur: always on the first view, rarely (p=0.1) on the second; full-image crops, no flips
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255).to(torch.uint8).expand(3, 16, 16)
    views = build_views("byol", image_size=16, channels=3, jitter_prob=0.0, grayscale_prob=0.0, flip_prob=0.0,
                        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), solarize_probs=(0.0, 0.0), blur_sigma=(1.0, 2.0))
    plain = views.pipelines[0].transforms[-1](views.pipelines[0].transforms[-2](checker))  # just normalised
    blurred = [0, 0]
    for _ in range(60):
        for k, v in enumerate(views(checker)):
            blurred[k] += int(not torch.allclose(v, plain, atol=1e-4))
    assert blurred[0] == 60 and blurred[1] <= 20


def test_mim_views_only_crop_and_flip():
    # colour jitter, grayscale, blur or solarize would change a constant image; crop and flip cannot
    const = torch.full((3, 32, 32), 90, dtype=torch.uint8)
    views = build_views("mim", image_size=16, channels=3)
    torch.manual_seed(0)
    for _ in range(20):
        (v,) = views(const)
        assert v.shape == (3, 16, 16)
        assert torch.allclose(v, _normalised(90)[:, None, None].expand(3, 16, 16), atol=1e-4)
    simclr = build_views("simclr", image_size=16, channels=3)
    changed = sum(not torch.allclose(simclr(const)[0], v, atol=1e-3) for _ in range(20))
    assert changed > 5


def test_strengths_are_options_and_unknown_ones_fail():
    views = build_views("simclr", image_size=16, channels=3, jitter_strength=0.5, blur_prob=0.0, flip_prob=0.0,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ops = " ".join(repr(p) for p in views.pipelines)
    assert "GaussianBlur" not in ops and "HorizontalFlip" not in ops and "brightness=(0.6, 1.4)" in ops
    with pytest.raises(ValueError, match="unknown option.*n_local"):
        build_views("simclr", image_size=16, channels=3, n_local=2)
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        build_views("autoaugment", image_size=16, channels=3)
    with pytest.raises(ValueError, match="grey"):
        build_views("mim", image_size=16, channels=1, grey="colourise")
    with pytest.raises(ValueError, match="uint8"):
        views(torch.rand(3, 16, 16))


def test_eval_transform_handles_single_images_and_batches():
    t = build_eval_transform(image_size=16, channels=1)
    assert t(image(1, 16)).shape == (1, 16, 16)
    batch = torch.stack([image(3, 32, seed=s) for s in range(4)])
    out = t(batch)
    assert out.shape == (4, 1, 16, 16) and out.dtype == torch.float32
    const = torch.full((1, 16, 16), 128, dtype=torch.uint8)
    assert torch.allclose(t(const), _normalised(128, 1)[:, None, None].expand(1, 16, 16), atol=1e-5)


def test_views_use_one_thread_and_restore_the_setting():
    seen = []
    views = build_views("mim", image_size=8, channels=1)
    views.pipelines.append(lambda img: seen.append(torch.get_num_threads()) or img)
    torch.set_num_threads(2)
    try:
        views(image(1, 8))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
