"""The five SFT primitives of the guide, plus `masked_mean`, as pure functions on tensors.

Signatures, argument names and return keys follow `sft_guide.md`, so code written
against the guide runs unchanged. Where the guide's code is wrong, these are right
(see the README, "Where posttrain differs from the guide").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.models.heads import body_hidden_states, find_linear_head, model_vocab_size
from posttrain.ops.full_logits import entropy_from_logits, log_probs_from_logits
from posttrain.ops.linear_log_probs import chunked_log_probs
from posttrain.ops.token_ids import check_token_ids

# --------------------------------------------------------------------------- tokenization


def pad_token_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an EOS token; "
        "set tokenizer.pad_token before tokenizing"
    )


def _check_strings(name: str, values: Sequence[str]) -> None:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(value).__name__}")


def encode_prompts_and_outputs(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (with special tokens, e.g. a BOS) and each output (without).

    Each side is tokenized in one batched call to the (fast) tokenizer.
    """
    _check_strings("prompt_strs", prompt_strs)
    _check_strings("output_strs", output_strs)
    if len(prompt_strs) != len(output_strs):
        raise ValueError(
            f"prompt_strs and output_strs differ in length: {len(prompt_strs)} prompts, "
            f"{len(output_strs)} outputs"
        )
    if len(prompt_strs) == 0:
        raise ValueError("empty batch: prompt_strs and output_strs have no elements")
    prompt_ids = tokenizer(list(prompt_strs), add_special_tokens=True)["input_ids"]
    output_ids = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    return prompt_ids, output_ids


def pad_and_shift(
    token_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[float]],
    pad_token_id: int,
) -> dict[str, Tensor]:
    """Right-pad whole sequences to the longest, then shift them into inputs and targets.

    Args:
        token_ids: one list of ids per sequence (prompt followed by response).
        loss_masks: per sequence, one weight per token of `token_ids` (1 where the
            token is a trained target, 0 elsewhere).
        pad_token_id: id written into the padding.

    Returns:
        `input_ids` (batch, max_len - 1) int64 = padded[:, :-1], `labels` (batch, max_len - 1)
        int64 = padded[:, 1:], `response_mask` (batch, max_len - 1) float32: the mask of each
        label. A target at position 0 has nothing to be predicted from, so it is dropped.
    """
    lengths = torch.tensor([len(row) for row in token_ids], dtype=torch.int64)
    if any(len(m) != len(t) for t, m in zip(token_ids, loss_masks, strict=True)):
        raise ValueError("each loss mask must have one entry per token")
    batch = len(token_ids)
    max_len = int(lengths.max()) if batch else 0
    padded = torch.full((batch, max_len), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((batch, max_len), dtype=torch.float32)
    # Scatter all rows at once from flat buffers: no Python loop over tokens.
    rows = torch.repeat_interleave(torch.arange(batch), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    padded[rows, cols] = torch.tensor(
        list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64
    )
    mask[rows, cols] = torch.tensor(
        list(itertools.chain.from_iterable(loss_masks)), dtype=torch.float32
    )
    return {
        "input_ids": padded[:, :-1].contiguous(),
        "labels": padded[:, 1:].contiguous(),
        "response_mask": mask[:, 1:].contiguous(),
    }


def tokenize_prompt_and_output(
    prompt_strs: list[str],
    output_strs: list[str],
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, Tensor]:
    """Tokenize prompt/output pairs for SFT, the loss mask covering output tokens only.

    Prompts are tokenized with the tokenizer's special tokens (a BOS where it adds one),
    outputs without; each pair is concatenated, right-padded with the pad token (EOS
    where there is none) to the batch's longest, then shifted by one.

    Returns:
        dict with `input_ids` (batch, max_len - 1) int64, `labels` (batch, max_len - 1)
        int64 and `response_mask` (batch, max_len - 1) float32, 1 exactly where `labels`
        holds an output token. `max_len` is the longest prompt + output in tokens.

    Raises:
        ValueError: lists of different lengths, an empty batch, a non-string element,
            or a tokenizer with neither a pad nor an EOS token.
    """
    pad_id = pad_token_id_of(tokenizer)
    prompt_ids, output_ids = encode_prompts_and_outputs(prompt_strs, output_strs, tokenizer)
    return build_rollout_batch(prompt_ids, output_ids, pad_id)


def _id_rows(name: str, rows: Sequence[Sequence[int]] | Tensor) -> list[list[int]]:
    """`rows` as lists of non-negative ints (a row may be a list, tuple or 1-D tensor)."""
    if isinstance(rows, str) or not isinstance(rows, (Sequence, Tensor)):
        raise ValueError(f"{name} must be a list of token-id lists, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        ids = row.tolist() if isinstance(row, Tensor) else row
        if isinstance(ids, (str, int)) or not isinstance(ids, Sequence):
            raise ValueError(f"{name}[{i}] must be a list of token ids, got {type(row).__name__}")
        for j, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"{name}[{i}][{j}] is {token!r}, not a token id (an int >= 0)")
        out.append(list(ids))
    return out


def build_rollout_batch(
    prompt_ids: Sequence[Sequence[int]] | Tensor,
    response_ids: Sequence[Sequence[int]] | Tensor,
    pad_token_id: int,
) -> dict[str, Tensor]:
    """The training batch of sampled responses, from the token ids themselves.

    RL must score the tokens the policy sampled: `generate`'s `Sample.token_ids`, the
    stop token (EOS) included. Decoding them to text and tokenizing again loses that
    EOS and can merge or split tokens differently, so the log-probs and clip ratio would
    be of tokens the policy never produced. `prompt_ids[i]` are the ids the prompt was
    given as (pass token-id prompts to `generate` to have them), `response_ids[i]` the
    ids sampled after it. Rows are padded and shifted exactly as
    `tokenize_prompt_and_output` pads them (`pad_and_shift`), with `pad_token_id`
    (`pad_token_id_of(tokenizer)`).

    Returns:
        `input_ids` (batch, max_len - 1) int64, `labels` (batch, max_len - 1) int64 and
        `response_mask` (batch, max_len - 1) float32, 1 exactly where `labels` holds a
        response id: those labels, row by row, are `response_ids[i]`. `max_len` is the
        longest prompt + response.

    Raises:
        ValueError: lists of different lengths, an empty batch, or an element that is
            not a list of non-negative int ids.
    """
    prompts = _id_rows("prompt_ids", prompt_ids)
    responses = _id_rows("response_ids", response_ids)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("empty batch: no prompts")
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    masks = [[0.0] * len(p) + [1.0] * len(r) for p, r in zip(prompts, responses, strict=True)]
    return pad_and_shift(sequences, masks, pad_token_id)


# --------------------------------------------------------------------------- entropy


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution over the last dimension.

    Args:
        logits: (..., vocab) unnormalised logits, any float dtype. Entries may be -inf
            (masked vocabulary) as long as each row has a finite one.

    Returns:
        (...) float32 entropies in nats (float64 for float64 logits). Computed in float32
        chunk by chunk over the leading dimensions, so bf16/fp16 logits are never copied
        whole to float32 and the extra memory is one chunk, also when gradients are kept.
    """
    return entropy_from_logits(logits)


# --------------------------------------------------------------------------- log-probs


def full_logits_log_probs(
    model: PreTrainedModel,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    positions: Tensor | None = None,
    return_token_entropy: bool = False,
) -> dict[str, Tensor]:
    """Log-probs (and entropy) from the model's own full logits: the path for heads the
    chunked kernels cannot reproduce, and the reference the lean path is tested against.

    input_ids, labels: (batch, seq) int64; positions: optional (batch, seq) bool, keeping
    only those positions (results are then flat, (n,)). Returns {"log_probs"} float32,
    plus "token_entropy" float32 when asked and "is_argmax" (bool, detached: the label has
    the largest logit).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if positions is not None:
        logits, labels = logits[positions], labels[positions]
    result = {"log_probs": log_probs_from_logits(logits, labels)}
    if return_token_entropy:
        result["token_entropy"] = entropy_from_logits(logits)
    result["is_argmax"] = logits.detach().argmax(-1) == labels
    return result


def lean_response_log_probs(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    return_token_entropy: bool = False,
    chunk_size: int | None = None,
    budget_bytes: int | None = None,
    positions: Tensor | None = None,
) -> dict[str, Tensor] | None:
    """`get_response_log_probs` without materialising the (batch, seq, vocab) logits.

    input_ids, labels: (B, T) int64, labels already shifted (labels[b, t] is the token
    predicted at position t) and each in [0, vocab). Returns {"log_probs": (B, T)
    float32} plus "token_entropy": (B, T) float32 when asked, or None when the model's
    head is not one `find_linear_head` supports (the caller then uses full logits).
    `positions`: optional (B, T) bool; only those positions go through the head (the
    response, say: the prompt's rows cost nothing there) and the others read 0.
    """
    head = find_linear_head(model)
    if head is None:
        return None
    hidden = body_hidden_states(model, input_ids, attention_mask)
    if positions is not None:
        hidden, labels = hidden[positions], labels[positions]
    log_probs, entropy = chunked_log_probs(
        hidden,
        head.weight,
        head.bias,
        labels,
        return_entropy=return_token_entropy,
        chunk_size=chunk_size,
        logit_scale=head.logit_scale,
        softcap=head.softcap,
        budget_bytes=budget_bytes,
    )
    out = {"log_probs": log_probs}
    if entropy is not None:
        out["token_entropy"] = entropy
    if positions is not None:
        out = {k: v.new_zeros(positions.shape).masked_scatter(positions, v) for k, v in out.items()}
    return out


def get_response_log_probs(
    model: PreTrainedModel,
    input_ids: Tensor,
    labels: Tensor,
    return_token_entropy: bool = False,
    *,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = None,
    lean: bool = True,
) -> dict[str, Tensor]:
    """Per-token log p(label | prefix) from a causal LM, unmasked.

    By default the (batch, seq, vocab) logits are never built: when the model's head
    is a plain linear projection (`posttrain.models.heads.find_linear_head`), log-probs and
    entropy are computed chunk by chunk through it, with exact gradients; other
    models fall back, with one log line, to the full-logits path.

    Args:
        model: any Hugging Face causal LM, on the device of `input_ids`.
        input_ids: (batch, seq) int64. labels: (batch, seq) int64, the shifted targets.
        return_token_entropy: also return the entropy of each next-token distribution.
        attention_mask: optional (batch, seq), 1 on real tokens.
        chunk_size: rows of logits per chunk on the lean path; None picks it from a
            memory budget (`posttrain.ops.projection.default_chunk_size`).
        lean: False forces the full-logits path.

    Returns:
        {"log_probs": (batch, seq) float32} plus "token_entropy": (batch, seq) float32 when
        asked. Gradients reach the model's parameters when grad is enabled.

    Raises:
        ValueError: mismatched shapes, or an id outside [0, vocab).
    """
    if input_ids.ndim != 2 or input_ids.shape != labels.shape:
        raise ValueError(
            "input_ids and labels must both be (batch, seq); got "
            f"{tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, "
            f"input_ids {tuple(input_ids.shape)}"
        )
    vocab = model_vocab_size(model)
    check_token_ids("labels", labels, vocab)
    check_token_ids("input_ids", input_ids, int(model.get_input_embeddings().weight.shape[0]))
    if lean:
        result = lean_response_log_probs(
            model,
            input_ids,
            labels,
            attention_mask=attention_mask,
            return_token_entropy=return_token_entropy,
            chunk_size=chunk_size,
        )
        if result is not None:
            return result
    full = full_logits_log_probs(
        model,
        input_ids,
        labels,
        attention_mask=attention_mask,
        return_token_entropy=return_token_entropy,
    )
    del full["is_argmax"]
    return full


# --------------------------------------------------------------------------- masked reductions


def _check_mask(tensor: Tensor, mask: Tensor) -> None:
    if mask.shape != tensor.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} differs from tensor shape {tuple(tensor.shape)}"
        )


def _masked(tensor: Tensor, mask: Tensor) -> Tensor:
    # where(), not tensor * mask alone: a masked-out -inf or NaN (a padding log-prob)
    # must contribute 0, not poison the sum.
    return torch.where(mask != 0, tensor * mask.to(tensor.dtype), 0.0)


def masked_normalize(
    tensor: Tensor,
    mask: Tensor,
    normalize_constant: float = 1.0,
    dim: int | None = None,
) -> Tensor:
    """Sum of `tensor * mask` over `dim` (everything when None), divided by a constant.

    Args:
        tensor: any shape, float. mask: the same shape; bool, int or float.
        normalize_constant: non-zero, finite (a Python number or a scalar tensor).
        dim: dimension to sum over (negative allowed), or None for all.

    Returns:
        A scalar when `dim` is None, else `tensor` with `dim` reduced.
    """
    _check_mask(tensor, mask)
    constant = (
        float(normalize_constant) if isinstance(normalize_constant, Tensor) else normalize_constant
    )
    if not isinstance(constant, (int, float)) or constant == 0 or not math.isfinite(constant):
        raise ValueError(
            f"normalize_constant must be a non-zero finite number, got {normalize_constant!r}"
        )
    masked = _masked(tensor, mask)
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    return total / normalize_constant


def masked_mean(tensor: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `tensor` over the elements where `mask` is non-zero, over `dim` (or all).

    A float mask weights elements: sum(tensor * mask) / sum(mask). Where the mask has
    no element the mean is 0 (and so is its gradient), so an empty response adds nothing.
    """
    _check_mask(tensor, mask)
    weights = mask.to(tensor.dtype)
    masked = _masked(tensor, mask)
    if dim is None:
        total, count = masked.sum(), weights.sum()
    else:
        total, count = masked.sum(dim=dim), weights.sum(dim=dim)
    return torch.where(count != 0, total / torch.where(count != 0, count, 1), 0.0)


# --------------------------------------------------------------------------- training step


def sft_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward the SFT loss of one micro-batch, scaled for gradient accumulation.

    loss = mean over the batch of (sum of the sequence's masked -log-probs / normalize_constant),
    then divided by `gradient_accumulation_steps`; `backward()` is called on it. Unlike the
    guide's code (which sums over the batch), the loss does not grow with the micro-batch size.

    Args:
        policy_log_probs: (batch, seq) float, requiring grad. response_mask: (batch, seq).
        gradient_accumulation_steps: micro-batches per optimizer step, >= 1.
        normalize_constant: divides each sequence's summed loss.

    Returns:
        (scaled loss, metadata), all detached; metadata holds `scaled_loss`, `unscaled_loss`,
        `num_response_tokens` and `mean_token_nll` (the masked mean -log-prob).
    """
    if isinstance(gradient_accumulation_steps, bool) or not isinstance(
        gradient_accumulation_steps, int
    ):
        raise ValueError(
            f"gradient_accumulation_steps must be an int, got {gradient_accumulation_steps!r}"
        )
    if gradient_accumulation_steps < 1:
        raise ValueError(
            f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}"
        )
    if policy_log_probs.ndim != 2:
        raise ValueError(
            f"policy_log_probs must be (batch, seq), got shape {tuple(policy_log_probs.shape)}"
        )
    per_sequence = masked_normalize(-policy_log_probs, response_mask, normalize_constant, dim=-1)
    loss = per_sequence.mean()
    scaled_loss = loss / gradient_accumulation_steps
    scaled_loss.backward()
    metadata = {
        "scaled_loss": scaled_loss.detach(),
        "unscaled_loss": loss.detach(),
        "num_response_tokens": (response_mask != 0).sum().detach(),
        "mean_token_nll": masked_mean(-policy_log_probs.detach(), response_mask),
    }
    return scaled_loss.detach(), metadata
