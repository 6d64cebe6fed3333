"""Generation: batched sampling with the KV cache (`decode`) and prompt templates
(`prompts`). `from posttrain.generation import generate` is the public entry point."""

from posttrain.generation.decode import (
    FINISH_REASONS,
    Sample,
    batch_order,
    encode_prompts,
    generate,
    greedy_generate,
    load_model_and_tokenizer,
    logits_entropy,
    resolve_device,
)

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
