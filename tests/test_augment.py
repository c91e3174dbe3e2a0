"""Batched view recipes: typed recipes, per-sample parameters that follow torchvision's distributions, pixel ops
that equal torchvision's on the same parameters, shapes and order of every recipe, grey handling, the eval
transform, determinism from the generator, and CPU = CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_models import build_eval_transform, build_views
from ssl_models.augment import (
    GREY_MEAN,
    GREY_STD,
    RECIPES,
    RGB_MEAN,
    RGB_STD,
    BYOLRecipe,
    MIMRecipe,
    MultiCropRecipe,
    _adjust_hue,
    _blur,
    _jitter_op,
    make_recipe,
    view_generator,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def batch(n=8, channels=3, size=32, seed=0, height=None):
    return torch.randint(
        0, 256, (n, channels, height or size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _normalised(value, channels=3):
    mean, std = (RGB_MEAN, RGB_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    return torch.tensor([(value / 255 - m) / s for m, s in zip(mean, std)])


# ------------------------------------------------------------------------------------------------- recipes
# the strengths and defaults of the per-image module this replaces (fcfb727), recipe by recipe
COMMON = {
    "flip_prob": 0.5,
    "crop_ratio": (3 / 4, 4 / 3),
    "affine_degrees": 0.0,
    "affine_translate": 0.0,
    "mean": None,
    "std": None,
}
COLOUR = {"jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_sigma": (0.1, 2.0)}
TODAY = {
    "simclr": {
        **COMMON,
        **COLOUR,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.4,
        "hue": 0.1,
        "crop_scale": (0.08, 1.0),
        "blur_prob": 0.5,
        "solarize_prob": 0.0,
    },
    "byol": {
        **COMMON,
        **COLOUR,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.2,
        "hue": 0.1,
        "crop_scale": (0.08, 1.0),
        "blur_probs": (1.0, 0.1),
        "solarize_probs": (0.0, 0.2),
    },
    "multicrop": {
        **COMMON,
        **COLOUR,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.2,
        "hue": 0.1,
        "global_scale": (0.4, 1.0),
        "local_scale": (0.05, 0.4),
        "n_local": 6,
        "local_size": None,
        "blur_probs": (1.0, 0.1, 0.5),
        "solarize_probs": (0.0, 0.2, 0.0),
    },
    "mim": {**COMMON, "crop_scale": (0.2, 1.0)},
}


@pytest.mark.parametrize("name", sorted(TODAY))
def test_recipe_defaults_are_todays_strengths(name):
    recipe = make_recipe(name)
    assert type(recipe) is RECIPES[name] and recipe.name == name
    assert dataclasses.asdict(recipe) == TODAY[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.flip_prob = 0.0
    views = build_views(name, image_size=32, channels=3)
    recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in TODAY[name].items()}
    recorded.update(mean=list(RGB_MEAN), std=list(RGB_STD))  # the statistics in use, not None
    assert {k: v for k, v in views.config.items() if k not in ("recipe", "image_size", "channels", "grey")} == recorded
    assert views.config["recipe"] == name and views.config["grey"] == "skip"
    # a run's recorded config rebuilds the same views
    config = dict(views.config)
    again = build_views(
        config.pop("recipe"),
        image_size=config.pop("image_size"),
        channels=config.pop("channels"),
        grey=config.pop("grey"),
        **config,
    )
    images = batch(4)
    assert all(torch.equal(a, b) for a, b in zip(views(images, gen()), again(images, gen())))
    assert build_views(name, image_size=28, channels=1, grey="expand").config["mean"] == list(RGB_MEAN)
    assert build_views(name, image_size=28, channels=1).config["std"] == list(GREY_STD)


def test_recipes_take_yaml_values_and_the_jitter_shorthand():
    r = make_recipe("simclr", crop_scale=[0.4, 1], jitter_strength=0.5, hue=0.05, flip_prob=0)
    assert r.crop_scale == (0.4, 1.0) and r.flip_prob == 0.0
    assert (r.brightness, r.contrast, r.saturation, r.hue) == pytest.approx((0.4, 0.4, 0.4, 0.05))
    assert hash(r) == hash(
        make_recipe(
            "simclr", crop_scale=(0.4, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, flip_prob=0.0
        )
    )
    assert isinstance(make_recipe("mim"), MIMRecipe) and isinstance(make_recipe("byol"), BYOLRecipe)
    # a recipe object is accepted as is, or with strengths replaced
    views = build_views(MultiCropRecipe(n_local=2, local_size=12), image_size=32, channels=3, n_local=3)
    assert views.sizes == [32, 32, 12, 12, 12]


@pytest.mark.parametrize(
    "name,key",
    [
        ("simclr", "n_local"),
        ("mim", "brightness"),
        ("mim", "jitter_strength"),
        ("byol", "blur_prob"),
        ("multicrop", "crop_scale"),
    ],
)
def test_an_unknown_key_is_a_type_error_naming_it(name, key):
    with pytest.raises(TypeError, match=rf"augment recipe {name}: unknown option\(s\) {key}"):
        make_recipe(name, **{key: 0.5})
    with pytest.raises(TypeError, match=key):
        build_views(name, image_size=16, channels=3, **{key: 0.5})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("flip_prob", 1.5, r"augment: flip_prob .*\[0\.0, 1\.0\]"),
        ("contrast", -2, r"augment: contrast: .*non negative"),
        ("brightness", "hot", r"augment: brightness must be a number"),
        ("hue", 0.7, r"augment: hue must be in \[0, 0\.5\]"),
        ("affine_degrees", -5, r"augment: affine_degrees must be non negative"),
        ("affine_translate", 2, r"augment: affine_translate"),
        ("crop_scale", [2, 1], r"augment: crop_scale must be \[lo, hi\] with 0 < lo <= hi <= 1\.0, got \[2, 1\]"),
        ("crop_ratio", [1, 0.5], r"augment: crop_ratio must be \[lo, hi\]"),
        ("blur_sigma", [0, 1], r"augment: blur_sigma"),
        ("blur_prob", True, r"augment: blur_prob must be a number"),
        ("std", [0.5, 0.0, 0.5], r"augment: std"),
        ("mean", [0.5, 0.5], r"augment: mean"),
    ],
)
def test_a_bad_value_is_a_value_error_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        make_recipe("simclr", **{key: value})


def test_bad_per_view_probabilities_sizes_and_arguments():
    with pytest.raises(ValueError, match=r"augment: blur_probs needs 2 probabilities"):
        make_recipe("byol", blur_probs=[1.0])
    with pytest.raises(ValueError, match=r"augment: solarize_probs needs 3 probabilities"):
        make_recipe("multicrop", solarize_probs=[0, 2, 0])
    with pytest.raises(ValueError, match="n_local >= 0 and local_size >= 2"):
        make_recipe("multicrop", local_size=1)
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        build_views("autoaugment", image_size=16, channels=3)
    with pytest.raises(ValueError, match="grey"):
        build_views("mim", image_size=16, channels=1, grey="colourise")
    with pytest.raises(ValueError, match="mean/std need 1"):
        build_views("mim", image_size=16, channels=1, grey="skip", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="uint8"):
        build_views("mim", image_size=16, channels=3)(torch.rand(2, 3, 16, 16), gen())


# --------------------------------------------------------------------------------------------- shapes/order
@pytest.mark.parametrize("recipe,count", [("simclr", 2), ("byol", 2), ("mim", 1), ("multicrop", 8)])
@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_normalised_float_batches(recipe, count, channels):
    views = build_views(recipe, image_size=24, channels=channels)
    out = views(batch(5, channels, 32), gen())
    assert len(out) == count == views.num_views
    local = max(2, round(24 * 96 / 224))
    assert views.sizes == ([24, 24] + [local] * 6 if recipe == "multicrop" else [24] * count)
    for v, size in zip(out, views.sizes):
        assert v.dtype == torch.float32 and v.shape == (5, channels, size, size) and v.is_contiguous()
    assert views.out_channels == channels
    # one C x H x W image gives unbatched views (torch's global generator when none is given)
    torch.manual_seed(0)
    single = views(batch(1, channels, 32)[0])
    assert [tuple(v.shape) for v in single] == [(channels, s, s) for s in views.sizes]


def test_multicrop_gives_two_global_then_local_crops():
    views = build_views("multicrop", image_size=32, channels=3, n_local=4, local_size=12)
    out = views(batch(3), gen())
    assert [tuple(v.shape[-2:]) for v in out] == [(32, 32)] * 2 + [(12, 12)] * 4
    assert views.sizes == [32, 32, 12, 12, 12, 12]
    params = views.sample_params(400, 32, 32, gen())
    areas = [(p.box[:, 2] * p.box[:, 3] / 1024).mean().item() for p in params]
    assert min(areas[:2]) > 0.55 and max(areas[2:]) < 0.3  # global (0.4, 1) vs local (0.05, 0.4) crops
    assert build_views("multicrop", image_size=224, channels=3).sizes == [224, 224] + [96] * 6  # DINO/SwAV


def test_grey_inputs_skip_colour_ops_or_expand():
    grey = batch(64, 1, 28)
    skip = build_views("simclr", image_size=28, channels=1, grey="skip")
    assert skip.jitter_ops == [0, 1] and skip.grayscale_prob == 0.0  # brightness, contrast only
    assert all(v.shape == (64, 1, 28, 28) for v in skip(grey, gen()))
    expand = build_views("simclr", image_size=28, channels=1, grey="expand")
    assert expand.jitter_ops == [0, 1, 2, 3] and expand.grayscale_prob == 0.2
    assert expand.out_channels == 3 and all(v.shape == (64, 3, 28, 28) for v in expand(grey, gen()))
    # an RGB batch handed to a grey recipe is converted (and vice versa)
    assert skip(batch(2, 3, 28), gen())[0].shape == (2, 1, 28, 28)
    assert build_views("mim", image_size=28, channels=3)(grey, gen())[0].shape == (64, 3, 28, 28)


# ------------------------------------------------------------------------------------------- randomness
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_same_generator_same_views_and_other_seeds_differ(recipe):
    views = (
        build_views(recipe, image_size=16, channels=3, n_local=2)
        if recipe == "multicrop"
        else build_views(recipe, image_size=16, channels=3)
    )
    images = batch(6, 3, 20)
    a, b, c = views(images, gen(7)), views(images, gen(7)), views(images, gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_view_generator_is_a_function_of_seed_epoch_step_rank():
    draws = {
        key: torch.rand(4, generator=view_generator(*key))
        for key in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 1, 1, 1)]
    }
    assert torch.equal(torch.rand(4, generator=view_generator(0, 1, 1, 1)), draws[(0, 1, 1, 1)])
    values = [tuple(d.tolist()) for d in draws.values()]
    assert len(set(values)) == len(values)  # every coordinate changes the stream
    assert view_generator(0, 0, 0, 0).device.type == "cpu"


def test_per_sample_parameters_differ_within_a_batch():
    views = build_views("simclr", image_size=32, channels=3, affine_degrees=10, affine_translate=0.1)
    p = views.sample_params(64, 32, 32, gen())[0]
    for values, least in (
        (p.box, 32),
        (p.angle, 60),
        (p.shift, 60),
        (p.factors, 60),
        (p.sigma, 60),
        (p.order, 16),
    ):  # 24 orders in all
        assert len(torch.unique(values.reshape(values.shape[0], -1), dim=0)) > least
    for flags in (p.flip, p.jitter, p.grayscale, p.blur):
        assert 0 < int(flags.sum()) < 64
    # and the pixels: a batch of one image repeated gives different views of it
    same = batch(1, 3, 32).expand(16, -1, -1, -1).contiguous()
    (v, _) = views(same, gen())
    assert len(torch.unique(v.reshape(16, -1), dim=0)) == 16


def _torchvision_boxes(n, height, width, scale, ratio):
    t = v2.RandomResizedCrop(8, scale=scale, ratio=ratio)
    img = torch.zeros(1, height, width, dtype=torch.uint8)
    torch.manual_seed(0)
    boxes = [t.make_params([img]) for _ in range(n)]
    return torch.tensor([[b["top"], b["left"], b["height"], b["width"]] for b in boxes], dtype=torch.float32)


@pytest.mark.parametrize(
    "height,width,scale,ratio",
    [(28, 28, (0.08, 1.0), (3 / 4, 4 / 3)), (32, 32, (0.4, 1.0), (3 / 4, 4 / 3)), (20, 32, (0.5, 1.0), (1.0, 3.0))],
)  # tries fail: fallback
def test_crop_boxes_follow_torchvision_distribution(height, width, scale, ratio):
    n = 3000
    ref = _torchvision_boxes(n, height, width, scale, ratio)
    views = build_views("mim", image_size=16, channels=1, crop_scale=scale, crop_ratio=ratio)
    ours = torch.cat([p.box for p in (views.sample_params(n, height, width, gen(1))[0],)])
    for column, what in [
        (lambda b: b[:, 2] * b[:, 3], "area"),
        (lambda b: torch.log(b[:, 3] / b[:, 2]), "ratio"),
        (lambda b: b[:, 0] + b[:, 2] / 2, "centre y"),
        (lambda b: b[:, 1] + b[:, 3] / 2, "x"),
    ]:
        result = stats.ks_2samp(column(ours).numpy(), column(ref).numpy())
        assert result.pvalue > 1e-3, (what, result)
    assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] + ours[:, 3] <= width).all() and (ours[:, 2:] >= 1).all()
    assert torch.equal(ours, ours.round())


def _binomial_ok(flags, p):
    k, n = int(flags.sum()), flags.numel()
    return stats.binomtest(k, n, p).pvalue > 1e-3


def test_flip_grayscale_jitter_blur_solarize_rates():
    views = build_views("byol", image_size=32, channels=3, flip_prob=0.3)
    first, second = views.sample_params(4000, 32, 32, gen(2))
    for flags, p in [
        (first.flip, 0.3),
        (second.flip, 0.3),
        (first.jitter, 0.8),
        (first.grayscale, 0.2),
        (first.blur, 1.0),
        (second.blur, 0.1),
        (first.solarize, 0.0),
        (second.solarize, 0.2),
    ]:
        assert _binomial_ok(flags, p), (flags.float().mean(), p)
    # flags are drawn independently of each other
    table = torch.zeros(2, 2)
    for a, b in zip(second.flip.tolist(), second.solarize.tolist()):
        table[int(a), int(b)] += 1
    assert stats.chi2_contingency(table.numpy()).pvalue > 1e-3


def test_jitter_factors_order_and_sigma_follow_torchvision():
    n = 3000
    views = build_views("simclr", image_size=32, channels=3, brightness=0.8, hue=0.2, blur_sigma=(0.5, 1.5))
    p = views.sample_params(n, 32, 32, gen(3))[0]
    jitter = v2.ColorJitter(0.8, 0.4, 0.4, 0.2)
    torch.manual_seed(0)
    ref = [jitter.make_params([torch.zeros(3, 4, 4)]) for _ in range(n)]
    for col, key, (lo, hi) in [
        (0, "brightness_factor", (0.2, 1.8)),
        (1, "contrast_factor", (0.6, 1.4)),
        (2, "saturation_factor", (0.6, 1.4)),
        (3, "hue_factor", (-0.2, 0.2)),
    ]:
        ours = p.factors[:, col]
        assert lo <= ours.min() and ours.max() <= hi and ours.max() - ours.min() > 0.95 * (hi - lo)
        assert stats.ks_2samp(ours.numpy(), [r[key] for r in ref]).pvalue > 1e-3, key
    # each of the 24 orders equally likely (torchvision: a random permutation per image)
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(torch.unique(codes, return_inverse=True)[1])
    assert len(counts) == 24 and stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert stats.kstest(p.sigma.numpy(), stats.uniform(0.5, 1.0).cdf).pvalue > 1e-3


# --------------------------------------------------------------------------------------------------- pixels
def test_geometry_identity_flip_and_crop_equal_torchvision():
    images = batch(4, 3, 16)
    views = build_views(
        "mim",
        image_size=16,
        channels=3,
        crop_scale=(1, 1),
        crop_ratio=(1, 1),
        flip_prob=0.0,
        mean=(0,) * 3,
        std=(1,) * 3,
    )
    (v,) = views(images, gen())
    assert torch.allclose(v, images.float() / 255, atol=1e-5)
    flipped = build_views(
        "mim",
        image_size=16,
        channels=3,
        crop_scale=(1, 1),
        crop_ratio=(1, 1),
        flip_prob=1.0,
        mean=(0,) * 3,
        std=(1,) * 3,
    )(images, gen())[0]
    assert torch.allclose(flipped, images.flip(-1).float() / 255, atol=1e-5)
    # a crop resized up equals torchvision's resized_crop of the same box (bilinear) on a smooth image
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = (torch.sin(xx / 5) * torch.cos(yy / 7) * 0.5 + 0.5).expand(8, 3, 32, 32).contiguous()
    views = build_views("mim", image_size=24, channels=3, flip_prob=0.0, mean=(0,) * 3, std=(1,) * 3)
    params = views.sample_params(8, 32, 32, gen(5))[0]
    ours = views._geometry(smooth, params, 24)
    for i, (top, left, h, w) in enumerate(params.box.int().tolist()):
        ref = TF.resized_crop(smooth[i], top, left, h, w, [24, 24], antialias=True)
        assert torch.allclose(ours[i], ref, atol=0.02), i


def test_rotation_and_shift_equal_torchvision_affine():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = (torch.sin(xx / 5 + yy / 9) * torch.cos(yy / 7) * 0.5 + 0.5).expand(1, 3, 32, 32).contiguous()
    views = build_views(
        "mim",
        image_size=32,
        channels=3,
        crop_scale=(1, 1),
        crop_ratio=(1, 1),
        flip_prob=0.0,
        affine_degrees=20,
        affine_translate=0.1,
    )
    p = views.sample_params(1, 32, 32, gen())[0]
    for angle, (tx, ty) in [(15.0, (3, -2)), (-8.0, (0, 4))]:
        p = dataclasses.replace(p, angle=torch.tensor([angle]), shift=torch.tensor([[tx / 32, ty / 32]]))
        ours = views._geometry(smooth, p, 32)[0]
        ref = TF.affine(
            smooth[0],
            angle=angle,
            translate=[tx, ty],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=v2.InterpolationMode.BILINEAR,
        )
        assert torch.allclose(ours[:, 6:26, 6:26], ref[:, 6:26, 6:26], atol=1e-4)  # inside: no fill differences
        if angle == 15.0:
            assert ours[:, 0, 0].abs().max() < 1e-6  # this corner comes from outside the image: black


def test_shrinking_views_are_antialiased():
    # a 1-pixel checkerboard shrunk 4x: point sampling would alias it into stripes, area averaging greys it
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8)
    images = checker.expand(2, 1, 32, 32).contiguous()
    views = build_views(
        "mim", image_size=8, channels=1, crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=0.0, mean=(0,), std=(1,)
    )
    (v,) = views(images, gen())
    assert torch.allclose(v, torch.full_like(v, 0.5), atol=0.02)


def test_colour_ops_equal_torchvision_on_the_same_factors():
    x = torch.rand(12, 3, 16, 16, generator=gen(4))
    x[:3, :, :4] = 0.5  # grey pixels
    x[3:6, 1] = x[3:6, 0]  # ties between the max channels
    f = torch.rand(12, generator=gen(5))
    for op, fn, factor in [
        (0, TF.adjust_brightness, 0.5 + f),
        (1, TF.adjust_contrast, 0.5 + f),
        (2, TF.adjust_saturation, 0.5 + f),
        (3, TF.adjust_hue, f - 0.5),
    ]:
        ref = torch.stack([fn(x[i], float(factor[i])) for i in range(12)])
        assert torch.allclose(_jitter_op(op, x, factor), ref, atol=1e-5), op
    grey = x[:, :1]
    ref = torch.stack([TF.adjust_contrast(grey[i], float(0.5 + f[i])) for i in range(12)])
    assert torch.allclose(_jitter_op(1, grey, 0.5 + f), ref, atol=1e-5)
    assert torch.allclose(_adjust_hue(x, torch.zeros(12)), x, atol=1e-5)
    sigma = 0.1 + 2 * f
    ref = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2) for i in range(12)])
    assert torch.allclose(_blur(x, sigma, 5), ref, atol=1e-5)


def test_random_order_per_sample_matches_torchvision_jitter():
    """The whole jitter on a batch equals torchvision's ColorJitter per image with the same factors and order."""
    views = build_views(
        "simclr",
        image_size=16,
        channels=3,
        crop_scale=(1, 1),
        crop_ratio=(1, 1),
        flip_prob=0.0,
        jitter_prob=1.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        mean=(0,) * 3,
        std=(1,) * 3,
    )
    images = batch(16, 3, 16, seed=3)
    (v, _) = views(images, gen(9))
    p = views.sample_params(16, 16, 16, gen(9))[0]
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(16):
        ref = images[i].float() / 255
        for op in p.order[i].tolist():
            ref = fns[op](ref, float(p.factors[i, op])).clamp(0, 1)
        assert torch.allclose(v[i], ref, atol=1e-4), i


def test_byol_views_are_asymmetric():
    # a constant image is unchanged by crop, flip and blur: only solarization (200 -> 55) can alter it
    const = torch.full((400, 3, 16, 16), 200, dtype=torch.uint8)
    views = build_views("byol", image_size=16, channels=3, jitter_prob=0.0, grayscale_prob=0.0)
    first, second = views(const, gen())
    solarized = [torch.allclose(v[:, 0, 0], _normalised(55), atol=1e-4) for v in second]
    assert all(torch.allclose(v[:, 0, 0], _normalised(200), atol=1e-4) for v in first)
    assert all(s or torch.allclose(v[:, 0, 0], _normalised(200), atol=1e-4) for s, v in zip(solarized, second))
    assert _binomial_ok(torch.tensor(solarized), 0.2)


def test_mim_views_only_crop_and_flip():
    # colour jitter, grayscale, blur or solarize would change a constant image; crop and flip cannot
    const = torch.full((20, 3, 32, 32), 90, dtype=torch.uint8)
    (v,) = build_views("mim", image_size=16, channels=3)(const, gen())
    assert torch.allclose(v, _normalised(90)[:, None, None].expand(20, 3, 16, 16), atol=1e-4)
    (s, _) = build_views("simclr", image_size=16, channels=3)(const, gen())
    changed = sum(not torch.allclose(s[i], v[i], atol=1e-3) for i in range(20))
    assert changed > 5


# ------------------------------------------------------------------------------------------------------ eval
def test_eval_transform_on_a_batch_equals_per_image():
    t = build_eval_transform(image_size=16, channels=1)
    images = batch(4, 3, 32)
    out = t(images)
    assert out.shape == (4, 1, 16, 16) and out.dtype == torch.float32 and t.out_channels == 1
    assert all(torch.allclose(out[i], t(images[i]), atol=1e-6) for i in range(4))
    const = torch.full((1, 16, 16), 128, dtype=torch.uint8)
    assert torch.allclose(t(const), _normalised(128, 1)[:, None, None].expand(1, 16, 16), atol=1e-5)
    rgb = build_eval_transform(image_size=32, channels=3)
    assert torch.allclose(
        rgb(images),
        (images.float() / 255 - torch.tensor(RGB_MEAN).view(1, 3, 1, 1)) / torch.tensor(RGB_STD).view(1, 3, 1, 1),
        atol=1e-5,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_equal_cpu_views():
    for recipe in sorted(RECIPES):
        views = build_views(recipe, image_size=32, channels=3, affine_degrees=10, affine_translate=0.1)
        images = batch(32, 3, 32)
        cpu = views(images, gen(11))
        cuda = views(images.cuda(), gen(11))
        for a, b in zip(cpu, cuda):
            assert b.device.type == "cuda"
            assert torch.allclose(a, b.cpu(), atol=1e-3), recipe


def test_augment_ops_bench_runs_in_its_tiny_mode(tmp_path, capsys):
    import json

    pytest.importorskip("kornia")
    from bench import augment_ops

    assert augment_ops.main(["--tiny", "--results-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "augment_ops-tiny.json").read_text())
    sides = {(r["input"], r["op"], r["side"]) for r in results["rows"]}
    for name in augment_ops.INPUTS:
        for op in augment_ops.OPS:
            assert (name, op, "torch") in sides
        for op in ("crop", "jitter", "blur", "simclr"):
            assert (name, op, "kornia") in sides
    assert all(r["images_per_s"] > 0 and r["threads"] == 1 for r in results["rows"])
    assert "| 1 | rgb32 | simclr |" in capsys.readouterr().out
