"""The four default methods train: 20 optimisation steps of each one's own recipe (augmentations, optimizer,
hooks) on 300 real CIFAR-10 images lower its loss on a fixed batch of views without collapsing the embedding."""
from __future__ import annotations

import pytest
import torch

from ssl_models import build_backbone, build_optimizer, build_views, collapse_report, registry
from ssl_models.augment import RECIPES
from ssl_models.registry import FAMILIES

DEFAULT_METHODS = {"simclr": "deep_metric_learning", "byol": "self_distillation",
                   "vicreg": "canonical_correlation_analysis", "mae": "masked_image_modeling"}
IMAGE_SIZE = 16      # crops of the 32x32 images: keeps 20 steps x 4 methods within seconds on 2 CPU cores
BATCH = 64
STEPS = 20
# CPU-sized heads; everything else (loss coefficients, temperature, momentum, mask ratio, optimizer) is the default
SMALL_HEADS = {
    "simclr": dict(projector_hidden_dim=128, projection_dim=64),
    "byol": dict(projector_hidden_dim=128, projection_dim=64, predictor_hidden_dim=128),
    "vicreg": dict(expander_dim=128),
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_backbone(name: str):
    default = registry.get(name).cls.default_backbone
    if default["name"].startswith("vit"):
        return build_backbone(**{**default, "image_size": IMAGE_SIZE, "embed_dim": 64, "depth": 2, "num_heads": 2})
    return build_backbone(**{**default, "width": 16})


@pytest.mark.parametrize("name", sorted(DEFAULT_METHODS))
def test_registered_with_family_and_recipe(name):
    spec = registry.get(name)
    assert spec.family == DEFAULT_METHODS[name] and spec.family in FAMILIES
    cls = spec.cls
    assert cls.augment in RECIPES
    assert cls.optimizer["name"] in ("lars", "adamw", "sgd") and cls.optimizer["base_lr"] > 0
    backbone = build_backbone(**{**cls.default_backbone, "image_size": 32})
    method = cls(backbone, **spec.defaults())          # the defaults are the constructor's own
    assert method.backbone is backbone
    assert isinstance(build_optimizer(method, cls.optimizer, 256), torch.optim.Optimizer)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(DEFAULT_METHODS))
def test_twenty_steps_lower_the_loss_without_collapse(name, cifar_tensors):
    images = (cifar_tensors[0] * 255).round().to(torch.uint8)
    cls = registry.get(name).cls
    torch.manual_seed(0)
    method = cls(small_backbone(name), **SMALL_HEADS[name])
    views = build_views(cls.augment, image_size=IMAGE_SIZE, channels=3)
    optimizer = build_optimizer(method, cls.optimizer, BATCH)

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
    method.on_train_start(STEPS)
    for step in range(STEPS):
        method.before_step(step, STEPS)
        out = method(view_batch(torch.randperm(len(images), generator=order)[:BATCH]))
        assert torch.isfinite(out["loss"]) and out["embedding"].requires_grad is False
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_step(step, STEPS)
    after, embedding = fixed_loss()
    print(f"{name}: fixed-batch loss {before:.4f} -> {after:.4f}, {collapse_report(embedding)}")

    assert after < before * 0.985, f"{name}: loss {before:.4f} -> {after:.4f}"
    report = collapse_report(embedding)
    # healthy embeddings have std ~ 1/sqrt(d) (ratio ~ 1); a collapsed one has ratio ~ 0
    assert report["emb_std_ratio"] > 0.3 and not report["collapsed"], report
