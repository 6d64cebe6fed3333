"""SFT's objective: response-token NLL (`posttrain.losses.nll`), and the gradient of one
step's micro-batches outside a run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from posttrain.common.distributed import DistInfo
from posttrain.common.sums import Sums
from posttrain.engine.run import accumulate
from posttrain.losses.nll import loss_weights as loss_weights
from posttrain.losses.nll import nll_objective, step_denominator


def accumulate_gradients(
    module: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    normalization: str,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
) -> Sums:
    """Forward and backward one SFT step's micro-batches through a policy module (wrapped
    or not): gradients add up to the gradient of the step's normalised loss."""
    denominator = step_denominator(batches, normalization, info)
    return accumulate(
        module, batches, nll_objective(normalization, denominator), info, autocast_dtype
    )
