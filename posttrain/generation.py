"""Greedy generation from a causal LM: the `posttrain generate` command and demo scoring."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from posttrain.checkpoints import load_pretrained


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when it is available, else the CPU; anything else is used as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here")
    return target


def load_model_and_tokenizer(
    model_dir: str | Path, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face model directory (model + tokenizer) for inference on `device`."""
    target = resolve_device(device)
    model, tokenizer = load_pretrained(model_dir)
    model.to(target).eval()
    return model, tokenizer


def _stop_and_pad_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[int | list[int], int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer and the model define no EOS token, so generation can't stop"
        )
    first_eos = eos[0] if isinstance(eos, list) else eos
    # Llama-style tokenizers have no pad token; every batch below has one prompt length,
    # so the pad id is never attended to and any id will do.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else first_eos
    return eos, pad


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions of `prompts`, each cut at the first EOS (which is not included).

    Prompts are batched by token length, so no batch needs padding: the result is
    exactly what generating each prompt alone would give.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos, pad = _stop_and_pad_ids(model, tokenizer)
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {index} encodes to no tokens: {prompts[index]!r}")
        by_length[len(ids)].append(index)

    device = next(model.parameters()).device
    completions: list[str] = [""] * len(prompts)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row, i in zip(output[:, length:].tolist(), chunk, strict=True):
                cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
                completions[i] = tokenizer.decode(row[:cut], skip_special_tokens=True)
    return completions


def exact_match_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 256,
) -> tuple[float, list[str]]:
    """The fraction of greedy completions equal to their answer, and the completions.

    A completion counts only if the model stops (emits EOS) right after the answer:
    `max_new_tokens` should leave room for the longest answer plus one token.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no examples to score")
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = sum(c == a for c, a in zip(completions, answers, strict=True))
    return correct / len(prompts), completions
