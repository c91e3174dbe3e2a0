"""ssl_models: the Cookbook's self-supervised learning methods in plain PyTorch, with no pipeline knowledge.

Usable alone: ``from ssl_models import registry, build_backbone``.
"""
from . import registry

__all__ = ["registry"]
