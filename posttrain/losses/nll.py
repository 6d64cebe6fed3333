"""Response-token NLL as an engine objective, normalised by the step's global count.

`loss_weights` and `step_denominator` divide the loss by the response tokens (or
sequences) of the whole optimizer step, counted over every micro-batch and rank, so that
the step's gradient is the same however the step is split into micro-batches and ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.common.distributed import DistInfo, all_reduce_sum
from posttrain.models.policy import Objective, batch_log_probs, nll_statistics


def loss_weights(response_mask: Tensor, normalization: str, denominator: Tensor | float) -> Tensor:
    """Per-token loss weights of a micro-batch, (batch, seq) float32.

    token: every response token weighs 1 / (response tokens in the global step), so the
    step's loss is the mean over its tokens however it is split into micro-batches.
    sequence: a sequence's tokens weigh 1 / (its response tokens * sequences with a
    response in the global step): each sequence's mean, averaged over sequences.
    """
    mask = response_mask.float()
    if normalization == "token":
        return mask / denominator
    per_row = mask.sum(-1, keepdim=True).clamp(min=1)
    return mask / per_row / denominator


def step_denominator(
    batches: Sequence[dict[str, Tensor]], normalization: str, info: DistInfo
) -> Tensor:
    """The global count that normalises a step's loss: response tokens or sequences, a
    0-dim float32 tensor on the device (summed there: no host sync)."""
    if normalization == "token":
        counts = [b["response_mask"].sum() for b in batches]
    else:
        counts = [(b["response_mask"].sum(-1) > 0).sum() for b in batches]
    local = torch.stack([c.to(info.device, torch.float64) for c in counts]).sum()
    return all_reduce_sum(local, info).clamp(min=1.0).float()


def nll_objective(normalization: str, denominator: Tensor) -> Objective:
    """The engine objective of one SFT step: a micro-batch's share of the step's mean
    response-token NLL, and its statistics."""

    def objective(module: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        weights = loss_weights(batch["response_mask"], normalization, denominator)
        out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], weights)
        return out.loss, nll_statistics(out, batch["attention_mask"])

    return objective


def token_weighted_nll_objective() -> Objective:
    """The engine objective of NLL on sampled responses with per-token weights already in
    the batch (`token_weights` (batch, seq) float32, e.g. 1 / the step's response tokens,
    0 on padding rows): `-sum(w * log p)` through the lean log-probs."""

    def objective(module: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        out = batch_log_probs(module, batch)
        weights = batch["token_weights"]
        return -(out["log_probs"] * weights).sum(), {"num_response_tokens": (weights > 0).sum()}

    return objective
