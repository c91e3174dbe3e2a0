"""Schema of the flow section of params.yaml (Prefect flows, deployments, sweeps)."""
from __future__ import annotations

from pydantic import Field

from .base import Section


class FlowConfig(Section):
    """Prefect flows: retries, schedules, sweeps."""

    retries: int = Field(1, ge=0)
    retry_delay_seconds: float = Field(5.0, ge=0)
