"""Softmax statistics of chunks of logits: dtypes, max-shifted logits, log-sum-exp,
entropy, and the memory budget that sizes every chunk."""

from __future__ import annotations

import torch
from torch import Tensor

# Working-set budget for one chunk of vocabulary-sized rows (logits and their scratch
# copies). For the head path this gives 256 rows of Qwen2.5's 151,936 vocabulary:
# measured on CPU, 128-row chunks were clearly slower and 1,024-row chunks missed the
# memory target.
DEFAULT_BUDGET_BYTES = 320 * 2**20

# Below this a label's probability has lost relative precision (float32 subnormals
# start at 1.2e-38), so its row's log-sum-exp is recomputed directly.
TINY_PROB = 1e-30


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and narrower inputs; float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any operand is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def rows_per_chunk(vocab_size: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """Rows of materialised logits per chunk: two float32 vocabulary rows per row fit
    `budget_bytes` (the chunk's float32 copy and one temporary)."""
    return max(1, budget_bytes // (8 * max(vocab_size, 1)))


def shifted_logits(logits: Tensor, row_max: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """z = x - max(x), logsumexp(z) and max(x) for a chunk of rows, in the accumulation dtype.

    Working on z rather than x keeps log p = z - logsumexp(z) and the entropy exact for
    logits of magnitude 1e4, where x - logsumexp(x) would cancel catastrophically.
    """
    x = logits.to(accumulation_dtype(logits.dtype))
    if row_max is None:
        row_max = x.amax(dim=-1)
    z = x - row_max.unsqueeze(-1)
    return z, torch.logsumexp(z, dim=-1), row_max


def probs_and_mean_z(z: Tensor, lse_z: Tensor) -> tuple[Tensor, Tensor]:
    """p = softmax(z) and E_p[z] per row; entries with p = 0 (z = -inf) are left out of
    E_p[z] explicitly, since 0 * -inf would be NaN."""
    p = torch.exp(z - lse_z.unsqueeze(-1))
    return p, (p * torch.where(p > 0, z, 0.0)).sum(-1)


def softmax_and_lse(z: Tensor, labels: Tensor, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax of each row of z into `out`, its log-sum-exp, and the label logit.

    z: (n, vocab) float logits; labels: (n,) int64; out: (n, vocab) buffer, overwritten.
    Returns (p = out, lse (n,), label_logit (n,)). One fused softmax pass instead of
    separate max/sub/exp passes (on CPU each elementwise pass costs a good fraction of the
    matmul); then lse = z_y - log p_y, exact unless p_y underflows, and those rare rows
    are recomputed directly.
    """
    label_logit = z.gather(1, labels[:, None]).squeeze(1)
    p = torch.softmax(z, dim=1, out=out)
    p_label = p.gather(1, labels[:, None]).squeeze(1)
    lse = label_logit - p_label.log()
    tiny = p_label < TINY_PROB
    if bool(tiny.any()):
        lse[tiny] = torch.logsumexp(z[tiny], dim=1)
    return p, lse, label_logit
