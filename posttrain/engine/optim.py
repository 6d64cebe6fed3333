"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def lr_lambda(
    schedule: str, warmup_steps: int, min_lr_ratio: float, total_steps: int
) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warmup over `warmup_steps`, then
    `schedule` ("constant", "linear" or "cosine") down to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D parameters) get
    no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass (CPU and CUDA); DTensor
    # parameters (FSDP) and other devices use the default implementation.
    plain = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=plain or None)
