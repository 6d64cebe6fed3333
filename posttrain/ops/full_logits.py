"""Entropy and label log-probs of materialised logits, chunk by chunk over rows.

These serve the guide's `compute_entropy` and the full-logits path of
`get_response_log_probs`: each chunk is upcast to float32 on its own, so bf16 logits are
never copied whole, and the entropy saves two floats per row for its backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from posttrain.ops.softmax import (
    accumulation_dtype,
    probs_and_mean_z,
    rows_per_chunk,
    shifted_logits,
)


def entropy_forward(flat: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entropy of each row of flat (N, vocab) logits: (entropy, row_max, lse_z), each (N,).

    H = logsumexp(z) - E_p[z] with z = x - max(x): exactly log V for uniform and 0 for
    one-hot logits.
    """
    dtype = accumulation_dtype(flat.dtype)
    entropy = torch.empty(flat.shape[0], dtype=dtype, device=flat.device)
    row_max, lse_z = torch.empty_like(entropy), torch.empty_like(entropy)
    for start in range(0, flat.shape[0], rows):
        stop = start + rows
        z, lse_z[start:stop], row_max[start:stop] = shifted_logits(flat[start:stop])
        entropy[start:stop] = lse_z[start:stop] - probs_and_mean_z(z, lse_z[start:stop])[1]
    return entropy, row_max, lse_z


def entropy_backward(
    flat: Tensor, row_max: Tensor, lse_z: Tensor, grad_entropy: Tensor, rows: int
) -> Tensor:
    """Gradient w.r.t. flat (N, vocab) logits: dH/dx_j = -p_j (z_j - E_p[z]), recomputed
    chunk by chunk from the saved row max and log-sum-exp."""
    grad_logits = torch.empty_like(flat)
    for start in range(0, flat.shape[0], rows):
        stop = start + rows
        z, _, _ = shifted_logits(flat[start:stop], row_max[start:stop])
        p, mean_z = probs_and_mean_z(z, lse_z[start:stop])
        centred = torch.where(p > 0, z - mean_z[:, None], 0.0)
        grad_logits[start:stop] = -grad_entropy[start:stop, None] * p * centred
    return grad_logits


class _ChunkedEntropy(torch.autograd.Function):
    """Adapter: `entropy_forward` / `entropy_backward`, saving two floats per row."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, rows: int) -> Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        entropy, row_max, lse_z = entropy_forward(flat, rows)
        ctx.save_for_backward(logits, row_max, lse_z)
        ctx.rows = rows
        return entropy.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad_entropy: Tensor) -> tuple[Tensor, None]:
        logits, row_max, lse_z = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = entropy_backward(flat, row_max, lse_z, grad_entropy.reshape(-1), ctx.rows)
        return grad.reshape(logits.shape), None


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy over the last dim of (..., vocab) logits -> (...) float32 (float64 stays).

    Entries may be -inf as long as each row has a finite one. Differentiable.
    """
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last dimension, got shape {tuple(logits.shape)}"
        )
    return _ChunkedEntropy.apply(logits, rows_per_chunk(logits.shape[-1]))


def log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] in float32 (float64 stays), chunk by chunk over rows.

    logits: (..., vocab) any float dtype; labels: (...) int64, in range. Returns (...).
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1, 1)
    rows = rows_per_chunk(vocab)
    pieces = []
    # split(), not slicing in a loop: the backward of each slice would write a full-size
    # zero gradient; split's backward concatenates the chunk gradients once.
    for chunk, chunk_labels in zip(flat.split(rows), flat_labels.split(rows), strict=True):
        z, lse_z, _ = shifted_logits(chunk)
        pieces.append(z.gather(-1, chunk_labels).squeeze(-1) - lse_z)
    return torch.cat(pieces).reshape(labels.shape)
