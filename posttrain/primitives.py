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
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Rows of logits processed at once by compute_entropy and the full-logits log-prob
# path: bounds their extra float32 memory to about this many bytes per chunk.
CHUNK_BYTES = 64 * 2**20


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
    sequences = [p + o for p, o in zip(prompt_ids, output_ids, strict=True)]
    masks = [[0.0] * len(p) + [1.0] * len(o) for p, o in zip(prompt_ids, output_ids, strict=True)]
    return pad_and_shift(sequences, masks, pad_id)


# --------------------------------------------------------------------------- entropy


def _rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(vocab_size, 1)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and narrower inputs; float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _shifted_logits(logits: Tensor, row_max: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """z = x - max(x), logsumexp(z) and max(x) for a chunk of rows, in the accumulation dtype.

    Working on z rather than x keeps log p = z - logsumexp(z) and the entropy exact for
    logits of magnitude 1e4, where x - logsumexp(x) would cancel catastrophically.
    """
    x = logits.to(accumulation_dtype(logits.dtype))
    if row_max is None:
        row_max = x.amax(dim=-1)
    z = x - row_max.unsqueeze(-1)
    return z, torch.logsumexp(z, dim=-1), row_max


def _probs_and_mean_z(z: Tensor, lse_z: Tensor) -> tuple[Tensor, Tensor]:
    """p = softmax(z) and E_p[z] per row; entries with p = 0 (z = -inf) are left out of
    E_p[z] explicitly, since 0 * -inf would be NaN."""
    p = torch.exp(z - lse_z.unsqueeze(-1))
    return p, (p * torch.where(p > 0, z, 0.0)).sum(-1)


class _ChunkedEntropy(torch.autograd.Function):
    """Entropy over the last dim, chunk by chunk; saves only two floats per row.

    H = logsumexp(z) - E_p[z], exactly log V for uniform and 0 for one-hot logits.
    Backward recomputes each chunk's probabilities: dH/dx_j = -p_j (z_j - E_p[z]).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor, rows: int) -> Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        dtype = accumulation_dtype(logits.dtype)
        entropy = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
        row_max, lse_z = torch.empty_like(entropy), torch.empty_like(entropy)
        for start in range(0, flat.shape[0], rows):
            stop = start + rows
            z, lse_z[start:stop], row_max[start:stop] = _shifted_logits(flat[start:stop])
            entropy[start:stop] = lse_z[start:stop] - _probs_and_mean_z(z, lse_z[start:stop])[1]
        ctx.save_for_backward(logits, row_max, lse_z)
        ctx.rows = rows
        return entropy.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_entropy: Tensor) -> tuple:
        logits, row_max, lse_z = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad_flat = grad_entropy.reshape(-1)
        grad_logits = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.rows):
            stop = start + ctx.rows
            z, _, _ = _shifted_logits(flat[start:stop], row_max[start:stop])
            p, mean_z = _probs_and_mean_z(z, lse_z[start:stop])
            centred = torch.where(p > 0, z - mean_z[:, None], 0.0)
            grad_logits[start:stop] = -grad_flat[start:stop, None] * p * centred
        return grad_logits.reshape(logits.shape), None


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
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last dimension, got shape {tuple(logits.shape)}"
        )
    return _ChunkedEntropy.apply(logits, _rows_per_chunk(logits.shape[-1]))


# --------------------------------------------------------------------------- log-probs


def check_token_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """Raise ValueError if `ids` is not an integer tensor, or naming its first id outside
    [0, vocab_size) (before it reaches an index kernel or a device-side assert)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        value = int(ids[bad][0])
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} holds token id {value} at position {where}, outside the model's "
            f"vocabulary [0, {vocab_size}); mask ignored positions with a valid id (e.g. 0) "
            "instead of a sentinel such as -100"
        )


def model_vocab_size(model: PreTrainedModel) -> int:
    """Number of rows of the output projection (the logits' last dimension)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] in float32 (float64 stays), chunk by chunk over rows.

    Args:
        logits: (..., vocab) any float dtype. labels: (...) int64, in range.

    Returns:
        (...) float32.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1, 1)
    rows = _rows_per_chunk(vocab)
    pieces = []
    # split(), not slicing in a loop: the backward of each slice would write a full-size
    # zero gradient; split's backward concatenates the chunk gradients once.
    for chunk, chunk_labels in zip(flat.split(rows), flat_labels.split(rows), strict=True):
        z, lse_z, _ = _shifted_logits(chunk)
        pieces.append(z.gather(-1, chunk_labels).squeeze(-1) - lse_z)
    return torch.cat(pieces).reshape(labels.shape)


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
    is a plain linear projection (`posttrain.chunked.find_linear_head`), log-probs and
    entropy are computed chunk by chunk through it, with exact gradients; other
    models fall back, with one log line, to the full-logits path.

    Args:
        model: any Hugging Face causal LM, on the device of `input_ids`.
        input_ids: (batch, seq) int64. labels: (batch, seq) int64, the shifted targets.
        return_token_entropy: also return the entropy of each next-token distribution.
        attention_mask: optional (batch, seq), 1 on real tokens.
        chunk_size: rows of logits per chunk on the lean path; None picks it from a
            memory budget (`posttrain.chunked.default_chunk_size`).
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
        from posttrain.chunked import lean_response_log_probs

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
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    result = {"log_probs": log_probs_from_logits(logits, labels)}
    if return_token_entropy:
        result["token_entropy"] = compute_entropy(logits)
    return result


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
