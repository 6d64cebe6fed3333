"""posttrain: supervised fine-tuning of causal language models."""

from posttrain.primitives import (
    compute_entropy,
    get_response_log_probs,
    masked_mean,
    masked_normalize,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
)

__all__ = [
    "compute_entropy",
    "get_response_log_probs",
    "masked_mean",
    "masked_normalize",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
]
__version__ = "0.1.0"
