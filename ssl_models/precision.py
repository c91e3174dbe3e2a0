"""Losses in float32 under mixed precision.

Under bf16/fp16 autocast a projector's output is half precision and autocast would run a loss's matmuls in half
precision too. Losses are small and sensitive (NT-Xent divides cosine similarities by a temperature of 0.1:
bf16 keeps ~3 significant digits, so 0.993 and 0.996 become the same logit; VICReg's covariance sums d^2
squares), so their forward runs with autocast off on float32 copies of the inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def _upcast(value):
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.float()
    return value


def float32_loss(forward: Callable) -> Callable:
    """Decorate a loss's ``forward`` (or any method): tensor arguments upcast to float32, autocast disabled.

    float64 inputs (the tests' references) stay float64.
    """

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return forward(self, *args, **kwargs)

    return wrapper
