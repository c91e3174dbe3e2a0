"""RotNet (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image Rotations",
arXiv 1803.07728): spatial context; the network is trained to tell by how much each image was rotated."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import build_mlp
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


def rotate_all(images: Tensor) -> tuple[Tensor, Tensor]:
    """Every image under the K = 4 rotations g(X; y) = Rot(X, 90 y degrees), y = 0..3 (paper, section 2.2).

    Returns (4B x C x H x W, labels 4B): rotation y of the whole batch is rows [yB, (y + 1)B), counter-clockwise
    (torch.rot90 on the spatial axes). The paper found feeding all 4 rotations of each image in the same batch
    better than one random rotation per image.
    """
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class RotationLoss(nn.Module):
    """The RotNet objective (paper, eq. 1-2): for N images X_i and the 4 rotations y,

        L = 1/(4N) sum_i sum_y -log F^y( g(X_i; y) )

    with F^y the softmax probability the network gives to rotation y: plain cross entropy over the 4 classes.
    """

    @float32_loss
    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)


@register("rotnet", family="origins", category="spatial_context")
class RotNet(SSLMethod):
    """Backbone on the 4 rotations of each image -> classifier over the 4 rotations (dropped at export).

    Defaults: the paper's recipe for its CIFAR-10 NIN is SGD with momentum 0.9, weight decay 5e-4, lr 0.1 at
    batch 128 (divided by 5 at set epochs; here the project's cosine). The paper reads the classifier off conv
    blocks; with a ResNet the classifier is a 2-layer MLP on the pooled backbone output (``hidden_dim`` 0: linear).
    Square digits stay digits under rotation, so rotating is a well-posed task there too (a 6 and a 9 are the
    exception the network must learn from context).
    """

    augment = "mim"  # one view: crop + flip; the rotations are the task, not an augmentation
    optimizer: dict[str, Any] = {
        "name": "sgd",
        "base_lr": 0.2,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "lr_scaling": "linear",
        "warmup_epochs": 0,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(self, backbone: nn.Module, *, hidden_dim: int = 512) -> None:
        super().__init__()
        if hidden_dim < 0:
            raise ValueError(f"rotnet: hidden_dim must be >= 0, got {hidden_dim}")
        self.backbone = backbone
        dims = [backbone.feature_dim] + ([hidden_dim] if hidden_dim else []) + [4]
        self.classifier = build_mlp(dims, batch_norm=True)
        self.criterion = RotationLoss()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        images = views[0]
        rotated, labels = rotate_all(images)
        features = self.backbone(rotated)
        logits = self.classifier(features)
        loss = self.criterion(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "embedding": features[: images.shape[0]].detach(), "rotation_accuracy": accuracy}
