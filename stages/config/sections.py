"""Schemas of the data and shard sections of params.yaml."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import Section


class DataConfig(Section):
    source: Literal["mnist5k", "folder", "archive", "cifar10"] = "mnist5k"
    path: Optional[str] = None
    train_per_class: int = Field(400, ge=1)
    test_per_class: int = Field(100, ge=1)
    image_mode: Literal["L", "RGB"] = "L"
    on_bad_image: Literal["skip", "fail"] = "skip"
    max_image_pixels: int = Field(25_000_000, ge=1)
    eval_path: Optional[str] = None


class ShardConfig(Section):
    shard_size: int = Field(1000, ge=1)
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
