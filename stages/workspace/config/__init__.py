"""Typed schema of params.yaml, validated before any stage does work.

``load_params()`` returns a :class:`Params` or raises :class:`~stages.workspace.common.ConfigError` with one line naming
the key and the problem (exit code 2 through :func:`stages.workspace.common.run_main`). Each stage's section lives in
its own module here; this module assembles the root.

The schema holds types, bounds and the rules between keys; its defaults are the shipped params.yaml's values
(tests/test_params.py keeps them equal), and params.yaml is where each key's meaning and the reason for its
value are written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError, field_validator

from ..common import ConfigError, workspace
from .base import Section, first_problem, read_yaml
from .evaluate import EvaluateConfig, ReportConfig
from .flow import FlowConfig
from .pretrain import PretrainConfig, validate_methods
from .sections import DataConfig, ShardConfig

PARAMS_FILE = "params.yaml"


class Params(Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    shard: ShardConfig = ShardConfig()
    methods: list[str] = ["simclr", "byol", "vicreg", "mae"]
    pretrain: PretrainConfig = PretrainConfig()
    method: dict[str, dict[str, Any]] = {}
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    flow: FlowConfig = FlowConfig()

    @field_validator("methods")
    @classmethod
    def _some_method(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("lists no method (the pipeline trains and reports at least one)")
        return v

    @field_validator("seed")
    @classmethod
    def _seed_non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v


def parse_params(raw: Any, path: Path | str = PARAMS_FILE) -> Params:
    """Validate an already-loaded params mapping."""
    path = Path(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        loc, msg = first_problem(err)
        raise ConfigError(f"{path.name}: {loc or '<root>'}: {msg}") from None
    validate_methods(params, path.name)
    return params


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate params.yaml (default: the workspace's)."""
    path = Path(path) if path else workspace() / PARAMS_FILE
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    return parse_params(read_yaml(path), path)


__all__ = ["Params", "load_params", "parse_params", "PARAMS_FILE"]
