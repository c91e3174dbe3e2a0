"""Schema of the pretrain section (common block) and the per-method blocks of params.yaml."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..common import ConfigError
from .base import Section

if TYPE_CHECKING:
    from . import Params


class PretrainConfig(Section):
    """The common block every method starts from; ``method.<name>`` overrides it key by key."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)
    base_lr: float = Field(0.3, gt=0)


def validate_methods(params: "Params", filename: str) -> None:
    """Every listed method must be registered; every per-method key must be known."""
    from ssl_models import registry

    known = registry.names()
    for i, name in enumerate(params.methods):
        if name not in known:
            raise ConfigError(f"{filename}: methods[{i}]: unknown method {name!r} (known: {', '.join(known)})")
    for name in params.method:
        if name not in known:
            raise ConfigError(f"{filename}: method.{name}: unknown method (known: {', '.join(known)})")
