"""SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv 2002.05709): deep metric learning with the NT-Xent loss over two augmented views."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..heads import build_mlp
from ..precision import float32_loss
from ..registry import register
from .base import SSLMethod


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (SimCLR, eq. 1).

    With z_1..z_2N the l2-normalised projections of the two views of N images (z_k and its positive z_k+ come from
    the same image), s_ij = z_i . z_j and temperature tau:

        l(i) = -log( exp(s_{i,i+} / tau) / sum_{k != i} exp(s_ik / tau) ),    L = 1/(2N) sum_i l(i)

    Every other view in the (global) batch is a negative. With ``gather_distributed`` the keys are the views of
    every rank (gathered with gradients) and each rank scores its own 2B queries; the mean over ranks is the
    single-process loss on the global batch.
    """

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NT-Xent temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    @float32_loss
    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        b = z1.shape[0]
        keys1, keys2 = (distributed.gather(z1), distributed.gather(z2)) if self.gather_distributed else (z1, z2)
        n = keys1.shape[0]
        offset = distributed.local_offset(b) if self.gather_distributed else 0
        queries = torch.cat([z1, z2])  # 2B x D
        keys = torch.cat([keys1, keys2])  # 2N x D: [view-1 of all, view-2 of all]
        logits = queries @ keys.T / self.temperature
        local = torch.arange(b, device=z1.device) + offset
        self_index = torch.cat([local, local + n])
        positive_index = torch.cat([local + n, local])
        logits = logits.masked_fill(F.one_hot(self_index, 2 * n).bool(), float("-inf"))
        return F.cross_entropy(logits, positive_index)


@register("simclr", family="deep_metric_learning")
class SimCLR(SSLMethod):
    """Backbone -> MLP projector -> NT-Xent between the two views.

    Defaults: SimCLR's 2-layer projector (2048 hidden, 128 out, BN as in SimCLR v2), LARS with weight decay 1e-6,
    10 warmup epochs and the paper's square-root rule lr = 0.075 x sqrt(B) = 1.2 x sqrt(B/256) (appendix B.1: better
    than the linear 0.3 x B/256 for small batches; both give 4.8 at B = 4096). Temperature 0.2: SimCLR found 0.1
    best for batch 4096 on ImageNet; small batches and CIFAR-scale runs do better slightly higher (MoCo v2 and the
    reference libraries use 0.2).
    """

    augment = "simclr"
    optimizer: dict[str, Any] = {
        "name": "lars",
        "base_lr": 1.2,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "lr_scaling": "sqrt",
        "warmup_epochs": 10,
    }
    default_backbone: dict[str, Any] = {"name": "resnet18", "small_image": True}

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projection_dim: int = 128,
        projector_hidden_dim: int = 2048,
        projector_layers: int = 2,
        temperature: float = 0.2,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if projector_layers < 1:
            raise ValueError(f"simclr: projector_layers must be >= 1, got {projector_layers}")
        self.backbone = backbone
        dims = [backbone.feature_dim] + [projector_hidden_dim] * (projector_layers - 1) + [projection_dim]
        self.projector = build_mlp(dims, batch_norm=True)
        self.criterion = NTXentLoss(temperature, gather_distributed)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"simclr needs 2 views, got {len(views)}")
        z1, z2 = self.projector(self.backbone(torch.cat(views[:2]))).chunk(2)
        loss = self.criterion(z1, z2)
        with torch.no_grad():
            positive_similarity = F.cosine_similarity(z1, z2, dim=1).mean()
        return {"loss": loss, "embedding": z1.detach(), "positive_similarity": positive_similarity}
