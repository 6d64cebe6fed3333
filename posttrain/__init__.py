"""posttrain: post-training of causal language models.

Importable from here: the guide's five primitives (plus `masked_mean`), the
policy-gradient losses with CS336's names, and the library's entry points:
`SFTConfig` and `train_sft` (`posttrain sft`), `generate`, `evaluate_answers` and
`get_reward_fn` (`posttrain eval`), and the engine a new method plugs into (`Method`,
`RunSettings`, `run_method`). Names load on first use (PEP 562), so
`import posttrain`, `posttrain --help` and other light commands never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from posttrain import _moved

_moved.install()

# Public name -> the module that defines it.
_EXPORTS = {
    "build_rollout_batch": "posttrain.primitives",
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
    "SFTConfig": "posttrain.config",
    "train_sft": "posttrain.sft.train",
    "generate": "posttrain.generation.decode",
    "evaluate_answers": "posttrain.evaluation.answers",
    "get_reward_fn": "posttrain.rewards",
    "Method": "posttrain.engine.method",
    "RunSettings": "posttrain.engine.settings",
    "run_method": "posttrain.engine.loop",
}

__all__ = [
    "Method",
    "RunSettings",
    "SFTConfig",
    "build_rollout_batch",
    "compute_entropy",
    "compute_group_normalized_rewards",
    "compute_grpo_clip_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "evaluate_answers",
    "generate",
    "get_response_log_probs",
    "get_reward_fn",
    "grpo_microbatch_train_step",
    "kl_penalty",
    "masked_mean",
    "masked_normalize",
    "run_method",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
    "train_sft",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from posttrain.config import SFTConfig
    from posttrain.engine.loop import run_method
    from posttrain.engine.method import Method
    from posttrain.engine.settings import RunSettings
    from posttrain.evaluation.answers import evaluate_answers
    from posttrain.generation.decode import generate
    from posttrain.primitives import (
        build_rollout_batch,
        compute_entropy,
        get_response_log_probs,
        masked_mean,
        masked_normalize,
        sft_microbatch_train_step,
        tokenize_prompt_and_output,
    )
    from posttrain.rewards import get_reward_fn
    from posttrain.rl import (
        compute_group_normalized_rewards,
        compute_grpo_clip_loss,
        compute_naive_policy_gradient_loss,
        compute_policy_gradient_loss,
        grpo_microbatch_train_step,
        kl_penalty,
    )
    from posttrain.sft.train import train_sft


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
