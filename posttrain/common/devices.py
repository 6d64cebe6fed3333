"""Devices and precision: moving batches, autocast."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a collated batch on `device` (non-blocking copies)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device`, or a disabled autocast when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
