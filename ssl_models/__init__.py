"""ssl_models: the Cookbook's self-supervised learning methods in plain PyTorch, with no pipeline knowledge.

Usable alone::

    from ssl_models import registry, build_backbone, build_views, build_optimizer
    backbone = build_backbone("resnet18", small_image=True, width=32)
    method = registry.get("simclr").cls(backbone)
    views = build_views(method.augment, image_size=32, channels=3)
"""

from . import augment, backbones, distributed, heads, methods, monitors, optim, precision, registry
from .augment import build_eval_transform, build_views
from .backbones import build_backbone
from .monitors import collapse_report, embedding_std, rankme
from .optim import build_optimizer, build_scheduler, scaled_lr

__all__ = [
    "registry",
    "methods",
    "backbones",
    "heads",
    "augment",
    "optim",
    "distributed",
    "monitors",
    "precision",
    "build_backbone",
    "build_views",
    "build_eval_transform",
    "build_optimizer",
    "build_scheduler",
    "scaled_lr",
    "embedding_std",
    "rankme",
    "collapse_report",
    "load_backbone",
]


def __getattr__(name: str):
    # load_backbone lives in ssl_models.io (the export slice); imported on first use only
    if name == "load_backbone":
        from .io import load_backbone

        return load_backbone
    raise AttributeError(f"module 'ssl_models' has no attribute {name!r}")
