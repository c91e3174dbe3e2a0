"""Schema of the flow section of params.yaml: how Prefect runs the DVC pipeline, on which schedule, and sweeps.

The flows read their settings from this section only (``FlowConfig.from_workspace``); ``sslcook run`` validates
the whole file first (``stages.pretrain.check_params``), since DVC deletes a stage's outputs before the stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from ..common import ConfigError
from .base import Section, first_problem, read_yaml


def _check_cron(value: str) -> str:
    """A cron string as Prefect's own schedules parse it (croniter; Prefect refuses its random and hashed forms)."""
    from croniter import croniter

    if not croniter.is_valid(value) or any(field.casefold() in ("r", "h") for field in value.split()):
        raise ValueError(f"{value!r} is not a cron expression (minute hour day-of-month month day-of-week)")
    return value


class SweepConfig(Section):
    """``sslcook sweep``: every combination of the grid's values runs as one DVC experiment."""

    grid: dict[str, list[Any]] = {"methods": [["simclr"], ["byol"]], "pretrain.base_lr": [0.1, 0.3]}
    max_parallel: int = Field(1, ge=1)
    metric: str = "linear_probe_top1"
    order: Literal["max", "min"] = "max"
    timeout_minutes: float = Field(720.0, gt=0)

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        return grid


class ScheduleConfig(Section):
    """Cron of each nightly deployment (``sslcook serve``; prefect.yaml holds the same): staggered, so runs
    rarely meet; when they do, the later one waits for the workspace."""

    new_data: str = "0 1 * * *"
    pipeline: str = "0 2 * * *"
    sweep: str = "0 3 * * *"

    @field_validator("new_data", "pipeline", "sweep")
    @classmethod
    def _cron(cls, value: str) -> str:
        return _check_cron(value)


class FlowConfig(Section):
    """Prefect flows: retries, DVC remote sync, the nightly schedule, sweeps."""

    retries: int = Field(1, ge=0)
    retry_delay_seconds: float = Field(5.0, ge=0)
    dvc_pull: bool = True
    dvc_push: bool = True
    log_tail_lines: int = Field(30, ge=1)
    schedule: ScheduleConfig = ScheduleConfig()
    timezone: str = "UTC"
    wait_minutes: float = Field(120.0, ge=0)
    sweep: SweepConfig = SweepConfig()

    @classmethod
    def from_workspace(cls, root: Path) -> FlowConfig:
        """Validate only the ``flow`` section of ``root/params.yaml`` (defaults when absent)."""
        path = Path(root) / "params.yaml"
        raw: Any = (read_yaml(path) or {}) if path.exists() else {}
        section = raw.get("flow", {}) if isinstance(raw, dict) else {}
        try:
            return cls.model_validate(section or {})
        except ValidationError as err:
            loc, msg = first_problem(err)
            raise ConfigError(f"{path.name}: flow.{loc}: {msg}") from None
