"""Schemas of the evaluate and report sections of params.yaml."""
from __future__ import annotations

from pydantic import Field

from .base import Section


class EvaluateConfig(Section):
    """Downstream evaluation (kNN, linear probe); extended by the evaluation stage."""

    batch_size: int = Field(512, ge=1)


class ReportConfig(Section):
    """The report stage."""

    title: str = "SSL cookbook report"
