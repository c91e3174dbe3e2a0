"""Methods registered by name with their Cookbook family.

    @register("simclr", family="deep_metric_learning")
    class SimCLR(SSLMethod): ...

``get(name)`` returns the :class:`MethodSpec`; ``names()`` lists what is registered.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAMILIES = (
    "deep_metric_learning",
    "self_distillation",
    "canonical_correlation_analysis",
    "masked_image_modeling",
    "origins",
)
# the Cookbook's categories of the pretext tasks before the four families ("origins of SSL")
ORIGINS_CATEGORIES = ("information_restoration", "spatial_context", "grouping")

_REGISTRY: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    cls: type

    def defaults(self) -> dict[str, Any]:
        """The method's own hyperparameters (its constructor's keyword defaults): its paper recipe."""
        sig = inspect.signature(self.cls.__init__)
        return {
            k: p.default
            for k, p in sig.parameters.items()
            if k not in ("self", "backbone")
            and p.default is not inspect.Parameter.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }


def register(name: str, *, family: str, category: str | None = None) -> Callable[[type], type]:
    """``category``: for the ``origins`` family, the Cookbook's kind of pretext task (ORIGINS_CATEGORIES)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if (family == "origins") != (category is not None) or (category and category not in ORIGINS_CATEGORIES):
        raise ValueError(f"method {name!r}: family origins needs a category, one of {ORIGINS_CATEGORIES}")

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        cls.family = family
        cls.category = category
        _REGISTRY[name] = MethodSpec(name, family, cls)
        return cls

    return deco


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> MethodSpec:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None
