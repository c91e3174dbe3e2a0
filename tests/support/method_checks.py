"""The checks every method's test module runs on its own method: registration and recipe, a forward pass at the
paper's sizes, and 20 optimisation steps on real CIFAR-10 images that lower the loss without collapsing the
embedding; plus the CPU-sized heads, fake views and the short training loop they share."""

from __future__ import annotations

import math

import torch

from ssl_models import build_backbone, build_optimizer, build_views, collapse_report, registry
from ssl_models.augment import RECIPES
from ssl_models.monitors import embedding_std
from ssl_models.registry import FAMILIES
from support.reference import randn

VIT = {"name": "vit_tiny", "image_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
# the standard stem (stride 2 + max-pool) keeps a 32 px ResNet-18 cheap on CPU; the small-image stem is 16x dearer
RESNET = {"name": "resnet18", "small_image": False, "width": 16}
# CPU-sized heads for the tests (the defaults are the papers'); everything else (loss coefficients, temperature,
# momentum, mask ratio, optimizer) is each method's own recipe
SMALL = {
    "simclr": dict(projector_hidden_dim=128, projection_dim=64),
    "byol": dict(projector_hidden_dim=128, projection_dim=64, predictor_hidden_dim=128),
    "vicreg": dict(expander_dim=128),
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "moco": dict(projection_dim=64, projector_hidden_dim=256, predictor_hidden_dim=256),
    "nnclr": dict(projection_dim=64, projector_hidden_dim=256, predictor_hidden_dim=256, support_set_size=256),
    "simsiam": dict(projection_dim=128, projector_hidden_dim=128, predictor_hidden_dim=32),
    "dino": dict(out_dim=256, head_hidden_dim=128, bottleneck_dim=32),
    "barlowtwins": dict(projection_dim=128, projector_hidden_dim=128),
    "swav": dict(projection_dim=32, projector_hidden_dim=128, num_prototypes=50, queue_length=128),
    "simmim": dict(),
}


def make(name: str, backbone: dict | None = None, **overrides):
    """``name`` with its CPU-sized heads on a small ViT (DINO, SimMIM) or a width-16 ResNet-18."""
    spec = registry.get(name)
    config = dict(backbone or (VIT if name in ("dino", "simmim") else RESNET))
    kwargs = {**SMALL[name], **overrides}
    return spec.cls(build_backbone(**config), **kwargs)


def fake_views(method, batch: int = 4, size: int = 32, channels: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if method.augment == "multicrop":
        sizes = [size, size, size // 2, size // 2]
    elif method.augment == "mim":
        sizes = [size]
    else:
        sizes = [size, size]
    return [torch.randn(batch, channels, s, s, generator=g) for s in sizes]


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def has_gradient(module: torch.nn.Module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(module))


# ---------------------------------------------------------------------------------------------- registration
def check_registered_with_family_and_recipe(name: str, family: str) -> None:
    """Registered under ``family`` with a known augmentation recipe and optimizer; the constructor's defaults build."""
    spec = registry.get(name)
    assert spec.family == family and spec.family in FAMILIES
    cls = spec.cls
    assert cls.augment in RECIPES
    assert cls.optimizer["name"] in ("lars", "adamw", "sgd") and cls.optimizer["base_lr"] > 0
    backbone = build_backbone(**{**cls.default_backbone, "image_size": 32})
    method = cls(backbone, **spec.defaults())  # the defaults are the constructor's own
    assert method.backbone is backbone
    assert isinstance(build_optimizer(method, cls.optimizer, 256), torch.optim.Optimizer)


def check_registered_with_paper_defaults(name: str, family: str, paper: dict) -> None:
    """Registered under ``family`` with a valid recipe, backbone and optimizer, and ``paper``'s hyperparameters."""
    spec = registry.get(name)
    assert spec.family == family
    cls = spec.cls
    assert cls.augment in RECIPES
    build_optimizer(torch.nn.Linear(2, 2), cls.optimizer, effective_batch=256)  # a valid recipe
    assert build_backbone(**cls.default_backbone).feature_dim > 0
    defaults = spec.defaults()
    assert {k: defaults[k] for k in paper} == paper


def check_forward_with_paper_defaults_and_grey_28px_inputs(name: str) -> None:
    torch.manual_seed(0)
    spec = registry.get(name)
    backbone_config = dict(spec.cls.default_backbone, in_chans=1)
    if backbone_config["name"].startswith("vit"):
        backbone_config.update(image_size=28, depth=1)
    else:
        backbone_config.update(width=8)
    method = spec.cls(build_backbone(**backbone_config))  # the paper-sized heads
    out = method(fake_views(method, batch=4, size=28, channels=1))
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    assert out["embedding"].shape[0] == 4 and out["embedding"].ndim == 2 and not out["embedding"].requires_grad
    out["loss"].backward()
    assert has_gradient(method.backbone)


def check_float32_under_autocast(loss, shapes: list[tuple[int, ...]], extra: tuple = ()) -> None:
    """Under bfloat16 autocast the loss upcasts its inputs and computes in exact float32."""
    inputs = [randn(*s, seed=20 + i).float() for i, s in enumerate(shapes)] + list(extra)
    reference = loss(*inputs)
    half = [x.bfloat16() for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(*half)
        outside = inputs[0].flatten(1) @ inputs[0].flatten(1).T
    assert outside.dtype == torch.bfloat16  # autocast is on around the loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss(*[x.float() for x in half]))  # upcast, then exact float32 maths
    torch.testing.assert_close(got, reference, atol=0.05, rtol=0.02)


# ---------------------------------------------------------------------------------------------- 20 steps, own recipe
def small_backbone(name: str, image_size: int):
    default = registry.get(name).cls.default_backbone
    if default["name"].startswith("vit"):
        return build_backbone(**{**default, "image_size": image_size, "embed_dim": 64, "depth": 2, "num_heads": 2})
    return build_backbone(**{**default, "width": 16})


def check_own_recipe_lowers_the_loss_without_collapse(name: str, cifar_tensors) -> None:
    """20 optimisation steps of the method's own recipe (augmentations, optimizer, hooks) on 300 real CIFAR-10
    images lower its loss on a fixed batch of views without collapsing the embedding."""
    image_size = 16  # crops of the 32x32 images: keeps 20 steps within seconds on 2 CPU cores
    batch, steps = 64, 20
    images = (cifar_tensors[0] * 255).round().to(torch.uint8)
    cls = registry.get(name).cls
    torch.manual_seed(0)
    method = cls(small_backbone(name, image_size), **SMALL[name])
    views = build_views(cls.augment, image_size=image_size, channels=3)
    optimizer = build_optimizer(method, cls.optimizer, batch)

    def view_batch(index):
        per_image = [views(images[i]) for i in index.tolist()]
        return [torch.stack([v[k] for v in per_image]) for k in range(views.num_views)]

    torch.manual_seed(1)
    fixed_views = view_batch(torch.arange(0, len(images), 3)[:96])

    @torch.no_grad()
    def fixed_loss():
        torch.manual_seed(2)  # same MAE masks before and after
        out = method(fixed_views)
        return float(out["loss"]), out["embedding"]

    method.train()
    before, _ = fixed_loss()
    order = torch.Generator().manual_seed(3)
    method.on_train_start(steps)
    for step in range(steps):
        method.before_step(step, steps)
        out = method(view_batch(torch.randperm(len(images), generator=order)[:batch]))
        assert torch.isfinite(out["loss"]) and out["embedding"].requires_grad is False
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_step(step, steps)
    after, embedding = fixed_loss()
    print(f"{name}: fixed-batch loss {before:.4f} -> {after:.4f}, {collapse_report(embedding)}")

    assert after < before * 0.985, f"{name}: loss {before:.4f} -> {after:.4f}"
    report = collapse_report(embedding)
    # healthy embeddings have std ~ 1/sqrt(d) (ratio ~ 1); a collapsed one has ratio ~ 0
    assert report["emb_std_ratio"] > 0.3 and not report["collapsed"], report


# ---------------------------------------------------------------------------------------------- 20 steps, shared views
N_BATCHES, BATCH = 5, 48  # 240 real images, each batch seen 4 times in 20 steps
_VIEW_CACHE: dict[str, list[list[torch.Tensor]]] = {}


def view_batches(images: torch.Tensor, recipe: str) -> list[list[torch.Tensor]]:
    """N_BATCHES fixed batches of views of real images, made once per recipe (so a loss can be compared on the same
    batches at the start and at the end of training, and methods sharing a recipe share the views)."""
    if recipe not in _VIEW_CACHE:
        strengths = {"n_local": 2} if recipe == "multicrop" else {}
        make_views = build_views(recipe, image_size=32, channels=3, **strengths)
        torch.manual_seed(0)
        order = torch.randperm(images.shape[0])  # the fixture is sorted by class; mix the classes in each batch
        uint8 = (images[order] * 255).round().to(torch.uint8)
        batches = []
        for s in range(N_BATCHES):
            per_image = [make_views(img) for img in uint8[s * BATCH : (s + 1) * BATCH]]
            batches.append([torch.stack([views[v] for views in per_image]) for v in range(len(per_image[0]))])
        _VIEW_CACHE[recipe] = batches
    return _VIEW_CACHE[recipe]


def train(method, batches: list[list[torch.Tensor]], steps: int = 20) -> tuple[list[float], list[torch.Tensor]]:
    optimizer = build_optimizer(
        method,
        {"name": "adamw", "base_lr": 2e-3, "weight_decay": 1e-4, "lr_scaling": "none"},
        effective_batch=batches[0][0].shape[0],
    )
    method.train()
    method.on_train_start(steps)
    losses, embeddings = [], []
    for step in range(steps):
        method.before_step(step, steps)
        out = method(batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_step(step, steps)
        losses.append(out["loss"].item())
        embeddings.append(out["embedding"])
    return losses, embeddings


def check_twenty_steps_on_cifar_lower_the_loss_without_collapse(name: str, cifar_tensors, before_training=None):
    """20 AdamW steps over N_BATCHES fixed batches of the method's views: the mean loss over the last pass is below
    the first pass's and the final embeddings keep their spread. ``before_training(method, batches)`` runs first."""
    images, _ = cifar_tensors
    torch.manual_seed(0)
    method = make(name)
    batches = view_batches(images, method.augment)
    n_batches = len(batches)
    if before_training is not None:
        before_training(method, batches)
    losses, embeddings = train(method, batches)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:n_batches]) / n_batches, sum(losses[-n_batches:]) / n_batches
    assert last < first, f"{name}: loss did not decrease over 20 steps ({first:.4f} -> {last:.4f})"
    final = torch.cat(embeddings[-n_batches:])
    d = final.shape[1]
    std_ratio = embedding_std(final) * math.sqrt(d)  # about 1 when spread over the sphere, 0 when collapsed
    print(f"{name}: loss {first:.4f} -> {last:.4f}, std ratio {std_ratio:.3f}")
    assert std_ratio > 0.2, f"{name}: embedding std {embedding_std(final):.4f} x sqrt({d}) = {std_ratio:.3f}"
