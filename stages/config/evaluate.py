"""Schemas of the evaluate and report sections of params.yaml."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section


class LinearProbeConfig(Section):
    """A linear layer on frozen, standardised features (AdamW, cosine schedule, early stopping on validation)."""

    epochs: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=0)  # 0: full batch
    val_fraction: float = Field(0.1, ge=0, lt=1)  # cut from train, stratified; 0: no early stopping
    patience: int = Field(10, ge=0)  # epochs without a better validation top-1; 0: never stop early


class EvaluateConfig(Section):
    """Downstream evaluation of an exported backbone (kNN, linear probe, collapse numbers, baselines)."""

    batch_size: int = Field(512, ge=1)
    knn_k: list[int] = [20, 200]
    knn_temperature: float = Field(0.1, gt=0)
    linear_probe: LinearProbeConfig = LinearProbeConfig()
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
