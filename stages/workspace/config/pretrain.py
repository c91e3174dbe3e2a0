"""Schema of the pretrain section (common block), the ``methods`` list and the ``method.<name>`` blocks.

A method's run is configured in three layers, later ones winning key by key:

1. the method's own recipe (its class: ``optimizer``, ``augment``, ``default_backbone``, constructor defaults);
2. ``pretrain``: the common block (engine knobs; optimizer/backbone/augment keys left null keep the recipe);
3. ``method.<name>``: keys of the common block (overrides for this method) or the method's constructor
   hyperparameters (``registry.get(name).defaults()``).

Nested blocks (augment, monitor, wandb) merge key by key; ``backbone`` is replaced whole when the override names
another architecture. :func:`resolve_method` returns the merged result.
"""

from __future__ import annotations

import copy
import functools
import typing
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..common import ConfigError
from .base import Section, first_problem

if TYPE_CHECKING:
    from ssl_models.registry import MethodSpec

    from . import Params


class OnlineKnnConfig(Section):
    """kNN top-1 of the backbone on the labelled splits while training (bank: train, queries: test)."""

    every_epochs: int = Field(0, ge=0)
    k: int = Field(20, ge=1)
    temperature: float = Field(0.1, gt=0)
    bank_size: int = Field(2000, ge=1)
    query_size: int = Field(1000, ge=1)


class MonitorConfig(Section):
    """Collapse monitors, checked at every epoch end."""

    min_std_ratio: float = Field(0.05, ge=0)
    min_rankme: float = Field(1.5, ge=0)
    loss_plateau_tolerance: float = Field(0.01, ge=0)
    fatal: bool = False
    samples: int = Field(512, ge=2)
    online_knn: OnlineKnnConfig = OnlineKnnConfig()


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "sslcook"
    entity: str | None = None
    tags: list[str] = []


class PretrainConfig(Section):
    """The common block every method starts from; ``method.<name>`` overrides it key by key."""

    epochs: int = Field(15, ge=1)
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["lars", "adamw", "sgd"] | None = None
    base_lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    warmup_epochs: float | None = Field(1.0, ge=0)
    final_lr_ratio: float = Field(0.0, ge=0, le=1)
    lr_scaling: Literal["linear", "sqrt", "none"] | None = None
    grad_clip: float | None = Field(None, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(1, ge=1)
    num_workers: int = Field(1, ge=0)
    loader_image_size: int | None = Field(None, ge=1)
    shuffle_buffer: int = Field(1000, ge=0)
    checkpoint_every_steps: int = Field(50, ge=0)
    on_bad_resume: Literal["fresh", "fail"] = "fresh"
    deterministic: bool = True
    log_every_steps: int = Field(10, ge=1)
    processes: Literal["auto"] | int = 1
    nodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = Field(None, pattern=r"^\[?[A-Za-z0-9_.:-]+\]?:[0-9]{1,5}$")
    rdzv_id: str | None = Field(None, min_length=1)
    node_rank: int | None = Field(None, ge=0)
    shards_url: str | None = Field(None, min_length=1)

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("expected auto or an integer >= 1")

    backbone: dict[str, Any] | None = {"name": "resnet18", "small_image": True, "width": 16, "stem_stride": 2}
    augment: dict[str, Any] = {"flip_prob": 0.0, "affine_degrees": 10, "affine_translate": 0.1}
    monitor: MonitorConfig = MonitorConfig()
    wandb: WandbConfig = WandbConfig()


PRETRAIN_KEYS = frozenset(PretrainConfig.model_fields)
_MERGED_BLOCKS = ("augment", "monitor", "wandb")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_overrides(common: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The common block with one method's overrides applied (see the module docstring)."""
    merged = copy.deepcopy(common)
    for k, v in override.items():
        if k in _MERGED_BLOCKS and isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        elif (
            k == "backbone"
            and isinstance(v, dict)
            and isinstance(merged.get(k), dict)
            and v.get("name", merged[k].get("name")) == merged[k].get("name")
        ):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = copy.deepcopy(v)
    return merged


@functools.cache
def hyperparameter_model(spec: MethodSpec) -> type[BaseModel]:
    """A strict pydantic model of a method's constructor hyperparameters (``spec.defaults()``), typed by the
    constructor's annotations: ``method.<name>`` values are checked against the signature itself."""
    hints = typing.get_type_hints(spec.cls.__init__)
    fields = {key: (hints.get(key, Any), default) for key, default in spec.defaults().items()}
    return create_model(
        f"{spec.cls.__name__}Hyperparameters", __config__=ConfigDict(strict=True, extra="forbid"), **fields
    )


def resolve_method(params: Params, name: str, filename: str = "params.yaml") -> tuple[PretrainConfig, dict[str, Any]]:
    """(merged pretrain config, constructor hyperparameters) of method ``name``; ConfigError naming the key."""
    from ssl_models import registry

    spec = registry.get(name)
    defaults = spec.defaults()
    block = params.method.get(name) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{filename}: method.{name}: must be a mapping of keys to values")
    common_over, hparams = {}, dict(defaults)
    for key, value in block.items():
        if key in PRETRAIN_KEYS:
            common_over[key] = value
        elif key in defaults:
            hparams[key] = value  # as written: config.json and the resume key record the user's values
        else:
            known = sorted(defaults)
            raise ConfigError(
                f"{filename}: method.{name}.{key}: unknown key (neither a pretrain key nor a "
                f"{name} hyperparameter: {', '.join(known) or 'none'})"
            )
    try:
        hyperparameter_model(spec).model_validate({k: v for k, v in block.items() if k not in PRETRAIN_KEYS})
    except ValidationError as err:
        loc, msg = first_problem(err)
        raise ConfigError(f"{filename}: method.{name}.{loc}: {msg}") from None
    merged = merge_overrides(params.pretrain.model_dump(), common_over)
    try:
        config = PretrainConfig.model_validate(merged)
    except ValidationError as err:
        loc, msg = first_problem(err)
        where = f"method.{name}.{loc}" if loc.split(".")[0] in common_over else f"pretrain.{loc}"
        raise ConfigError(f"{filename}: {where}: {msg}") from None
    return config, hparams


def validate_methods(params: Params, filename: str) -> None:
    """Every listed method is registered and has its block; every ``method.<name>`` key is known and typed."""
    from ssl_models import registry

    known = registry.names()
    for i, name in enumerate(params.methods):
        if name not in known:
            raise ConfigError(f"{filename}: methods[{i}]: unknown method {name!r} (known: {', '.join(known)})")
    if len(set(params.methods)) != len(params.methods):
        raise ConfigError(f"{filename}: methods: a method is listed twice ({params.methods})")
    for name in params.method:
        if name not in known:
            raise ConfigError(f"{filename}: method.{name}: unknown method (known: {', '.join(known)})")
    for name in params.methods:
        if not params.method.get(name):
            raise ConfigError(
                f"{filename}: method.{name}: missing or empty (each method in `methods` needs a "
                f"method.{name} block with at least one key: dvc.yaml depends on it)"
            )
    for name in params.method:
        resolve_method(params, name, filename)
