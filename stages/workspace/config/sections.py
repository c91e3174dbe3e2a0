"""Schemas of the data and shard sections of params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section

MNIST5K_PER_CLASS = 500  # mnist_5k.csv.gz holds 500 digits of each class


class DataConfig(Section):
    """What ``sslcook data ingest`` brings into data/raw, and how images are read (ingest and shard)."""

    source: Literal["mnist5k", "folder", "archive", "cifar10"] = "mnist5k"
    path: str | None = None
    train_per_class: int = Field(400, ge=1)
    test_per_class: int = Field(100, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    image_mode: Literal["L", "RGB"] = "L"
    on_bad_image: Literal["skip", "fail"] = "skip"
    max_image_pixels: int = Field(25_000_000, ge=1)
    eval_path: str | None = None
    follow_symlinks: bool = False

    @model_validator(mode="after")
    def _mnist_split_fits(self) -> DataConfig:
        if self.source == "mnist5k" and self.train_per_class + self.test_per_class > MNIST5K_PER_CLASS:
            raise ValueError(
                f"train_per_class + test_per_class = {self.train_per_class + self.test_per_class} "
                f"exceeds the {MNIST5K_PER_CLASS} mnist5k digits per class"
            )
        return self


class ShardConfig(Section):
    """data/raw -> WebDataset shards."""

    shard_size: int = Field(1000, ge=1)
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    image_size: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0)
