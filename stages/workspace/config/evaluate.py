"""Schemas of the evaluate and report sections of params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


class LinearProbeConfig(Section):
    """L2-regularised multinomial logistic regression on frozen, standardised features (L-BFGS), C chosen on a
    validation split of train, then refit on all of train (``ssl_models.evaluation.linear_probe``)."""

    c_grid: list[float] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    max_iter: int = Field(1000, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    backend: Literal["auto", "sklearn", "torch"] = "auto"

    @field_validator("c_grid")
    @classmethod
    def _grid_positive(cls, v: list[float]) -> list[float]:
        if not v or any(not c > 0 for c in v):
            raise ValueError("needs at least one value, each > 0")
        if len(set(v)) != len(v):
            raise ValueError("lists a value twice")
        return v

    @model_validator(mode="after")
    def _validation_to_choose(self) -> LinearProbeConfig:
        if len(self.c_grid) > 1 and self.val_fraction == 0:
            raise ValueError("val_fraction 0 leaves nothing to choose C on: give c_grid a single value")
        return self


class BootstrapConfig(Section):
    """Bootstrap over the test images: intervals of every headline accuracy, paired comparisons to baselines."""

    resamples: int = Field(2000, ge=1000)
    level: float = Field(0.95, gt=0.5, lt=1)


class EvaluateConfig(Section):
    """Downstream evaluation of an exported backbone (kNN, linear probe, collapse numbers, baselines)."""

    batch_size: int = Field(512, ge=1)
    knn_k: list[int] = [20, 200]
    knn_temperature: float = Field(0.1, gt=0)
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    baselines: bool = True
    raw_pixels_max_side: int = Field(32, ge=1)
    projection_points: int = Field(1000, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("knn_k")
    @classmethod
    def _ks_positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("needs at least one k, each >= 1")
        if len(set(v)) != len(v):
            raise ValueError("lists a k twice")
        return v


class ReportConfig(Section):
    """The report stage."""

    title: str = "SSL cookbook report"
    view_grid_images: int = Field(4, ge=1, le=16)
    plot_dpi: int = Field(110, ge=50, le=300)
