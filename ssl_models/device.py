"""Where to compute: the one device rule of training, feature extraction and the linear probe."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device was asked for that this machine does not have (the message is one line)."""


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else CPU. ``cuda`` without a GPU is an error, not a silent CPU run."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {preference!r} requested but no CUDA device is available")
    return torch.device(preference)
