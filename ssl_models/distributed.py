"""torch.distributed helpers: rank/world size, gathering embeddings WITH gradients, SyncBatchNorm.

Losses that contrast or decorrelate over the global batch (SimCLR, MoCo v3, NNCLR, VICReg, Barlow Twins, SwAV)
gather every rank's embeddings. ``torch.distributed.all_gather`` returns tensors with no autograd history, so a
naive gather silently drops the gradient flowing to the other ranks' samples (the classic bug). :func:`gather`
is differentiable: its backward sums (all-reduces) the gradient of the gathered tensor over ranks and hands each
rank the slice of its own samples.

Why a sum: rank r computes a loss L_r from the gathered batch; DDP then averages parameter gradients over ranks,
i.e. optimises (1/W) * sum_r L_r. Sample i lives on one rank only, so that rank must receive
sum_r dL_r/dz_i; DDP's 1/W turns it into the gradient of the mean loss. Equivalently: each rank's local input
gradient is W times the single-process gradient of the mean loss on the concatenated batch (tests check this).

Every function works unchanged in a single process (no process group): gather returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.batch = tensor.shape[0]
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (B x ...) from every rank along dim 0 in rank order, differentiably.

    Every rank must pass the same shape (the loader gives every rank equal batches). Rank r's own rows are
    ``[r * B, (r + 1) * B)`` of the result: see :func:`local_offset`.
    """
    if not is_distributed() or get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: Tensor) -> Tensor:
    """All-gather without autograd, for queues and support sets (MoCo, NNCLR) that are never differentiated."""
    if not is_distributed() or get_world_size() == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


def local_offset(batch_size: int) -> int:
    """Index of this rank's first sample in a gathered batch."""
    return get_rank() * batch_size


@torch.no_grad()
def all_reduce_mean(value: Tensor | float) -> Tensor:
    """Mean over ranks of a (detached) tensor or number, for logging; the value itself in one process."""
    t = torch.as_tensor(value, dtype=torch.float64).clone() if not isinstance(value, Tensor) else value.detach().clone()
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


@torch.no_grad()
def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum over ranks (no autograd): e.g. SwAV's Sinkhorn marginals, DINO's centre."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Replace BatchNorm layers by SyncBatchNorm when several ranks train on accelerators.

    Unchanged in one process (plain BatchNorm is the same thing there) and on CPU: PyTorch's SyncBatchNorm only
    runs on GPU-like devices, so CPU (gloo) ranks keep per-rank batch statistics. ``device`` defaults to the
    device of the module's first parameter.
    """
    if not is_distributed() or get_world_size() == 1:
        return module
    if device is None:
        first = next(module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    if torch.device(device).type == "cpu":
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
