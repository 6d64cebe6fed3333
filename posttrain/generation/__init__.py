"""Generation: batched decoding with the KV cache (`decode`), the logits processors that
sample and record entropy (`sampling`), and prompt templates (`prompts`).
`from posttrain.generation import generate` is the public entry point."""

from posttrain.generation.decode import (
    FINISH_REASONS,
    Sample,
    batch_order,
    encode_prompts,
    generate,
    greedy_generate,
    load_model_and_tokenizer,
    resolve_device,
)
from posttrain.generation.sampling import logits_entropy

__all__ = [
    "FINISH_REASONS",
    "Sample",
    "batch_order",
    "encode_prompts",
    "generate",
    "greedy_generate",
    "load_model_and_tokenizer",
    "logits_entropy",
    "resolve_device",
]
