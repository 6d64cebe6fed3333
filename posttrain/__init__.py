"""posttrain: supervised fine-tuning of causal language models.

The guide's five primitives (plus `masked_mean`) and the policy-gradient losses are
importable from here: `from posttrain import get_response_log_probs`. They are loaded on
first use (PEP 562), so `posttrain --help` and other light commands never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from posttrain import _moved

_moved.install()

# Public name -> the module that defines it.
_EXPORTS = {
    "compute_entropy": "posttrain.primitives",
    "get_response_log_probs": "posttrain.primitives",
    "masked_mean": "posttrain.primitives",
    "masked_normalize": "posttrain.primitives",
    "sft_microbatch_train_step": "posttrain.primitives",
    "tokenize_prompt_and_output": "posttrain.primitives",
    "compute_group_normalized_rewards": "posttrain.rl",
    "compute_grpo_clip_loss": "posttrain.rl",
    "compute_naive_policy_gradient_loss": "posttrain.rl",
    "compute_policy_gradient_loss": "posttrain.rl",
    "grpo_microbatch_train_step": "posttrain.rl",
    "kl_penalty": "posttrain.rl",
}

__all__ = [
    "compute_entropy",
    "compute_group_normalized_rewards",
    "compute_grpo_clip_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "get_response_log_probs",
    "grpo_microbatch_train_step",
    "kl_penalty",
    "masked_mean",
    "masked_normalize",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from posttrain.primitives import (
        compute_entropy,
        get_response_log_probs,
        masked_mean,
        masked_normalize,
        sft_microbatch_train_step,
        tokenize_prompt_and_output,
    )
    from posttrain.rl import (
        compute_group_normalized_rewards,
        compute_grpo_clip_loss,
        compute_naive_policy_gradient_loss,
        compute_policy_gradient_loss,
        grpo_microbatch_train_step,
        kl_penalty,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
