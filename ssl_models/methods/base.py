"""The interface every SSL method implements (the training engine relies on nothing else)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn


class SSLMethod(nn.Module):
    """A self-supervised method: a backbone plus heads plus a loss.

    Class attributes (recipe defaults, overridable from params):
      name, family   set by :func:`ssl_models.registry.register`
      augment        name of the view recipe in :mod:`ssl_models.augment` ("simclr", "byol", "multicrop", "mim")
      optimizer      default optimizer recipe, e.g. {"name": "lars", "base_lr": 0.3, "weight_decay": 1e-6}
      uses_dataset   True for methods that look at the whole training set each epoch (DeepCluster): the trainer
                     then calls ``on_epoch_start`` with a pass over the training set and ``on_batch`` with each
                     batch's sample keys

    ``forward(views)`` takes the list of view batches (each B x C x H x W, same order the augment recipe returns)
    and returns a dict with at least ``loss`` (scalar, differentiable) and ``embedding`` (B x D, detached: the
    projector/backbone output the collapse monitors watch), plus any diagnostics (scalars) it knows.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    augment: ClassVar[str] = "simclr"
    optimizer: ClassVar[dict[str, Any]] = {"name": "lars", "base_lr": 0.3, "weight_decay": 1e-6}

    category: ClassVar[str | None] = None  # origins family only: the Cookbook's kind of pretext task
    uses_dataset: ClassVar[bool] = False

    backbone: nn.Module

    def on_train_start(self, total_steps: int) -> None:
        """Called once before training with the planned number of optimisation steps."""

    def on_epoch_start(
        self, epoch: int, dataset: Callable[[], Iterable[tuple[list[torch.Tensor], Any, list[str]]]] | None
    ) -> None:
        """Called before an epoch's first batch (not when resuming inside the epoch: the method's state holds
        what it computed then). ``dataset()`` iterates this rank's share of the training set once, in a fixed
        order, with the evaluation transform: ``(views, labels, keys)`` batches (None unless ``uses_dataset``)."""

    def on_batch(self, keys: list[str]) -> None:
        """The sample keys of the batch about to be trained on (called only when ``uses_dataset``)."""

    def before_step(self, step: int, total_steps: int) -> None:
        """Schedules that change per step (teacher temperature, ...), before forward."""

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Per-step updates after optimizer.step(): EMA teachers, queues, ..."""

    def exported_backbone(self) -> nn.Module:
        """The encoder that export writes and evaluation measures: the trained backbone, unless the paper
        evaluates another one (I-JEPA evaluates its EMA target encoder)."""
        return self.backbone

    def teacher_modules(self) -> dict[str, nn.Module]:
        """Modules trained without gradients (EMA teachers): saved in checkpoints, dropped at export."""
        return {}
