"""Chunks of logits through a linear output head, written into reused buffers.

logits = softcap(scale * (hidden @ weight.T + bias)), softcap(x) = cap * tanh(x / cap)
when a cap is set. The kernels in `linear_log_probs` and `fused_nll` push a chunk of rows
at a time through a `Projector` and never hold more than a chunk of logits.
"""

from __future__ import annotations

import torch

from posttrain.ops.softmax import DEFAULT_BUDGET_BYTES
from posttrain.ops.workspace import Workspace


def default_chunk_size(
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype = torch.float32,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> int:
    """Rows per chunk so that one chunk's working set fits in `budget_bytes`.

    The working set per row is two float32 (float64 for float64 inputs) vocabulary-
    sized buffers, plus one in the matmul dtype when that is narrower, plus the
    row's hidden state. Rounded down to a multiple of 32 rows when that many fit;
    at least 1. For Qwen2.5 (151,936 vocabulary) in float32 this is 256 rows.
    """
    if vocab_size <= 0 or hidden_size <= 0:
        raise ValueError(
            f"vocab_size and hidden_size must be positive, got {vocab_size}, {hidden_size}"
        )
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    compute = 8 if dtype == torch.float64 else 4
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = 2 * compute * vocab_size + 4 * hidden_size
    if itemsize < compute:
        per_row += itemsize * vocab_size
    rows = budget_bytes // per_row
    if rows >= 32:
        rows -= rows % 32
    return max(1, int(rows))


def resolve_chunk_size(
    chunk_size: int | None,
    weight: torch.Tensor,
    dtype: torch.dtype,
    budget_bytes: int | None,
) -> int:
    """`chunk_size` checked (>= 1), or the default for this head and dtype."""
    if chunk_size is None:
        vocab, width = weight.shape
        budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
        return default_chunk_size(vocab, width, dtype, budget)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return int(chunk_size)


def check_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> None:
    """ValueError unless weight is (vocab, hidden's last dim), bias (vocab,) or None,
    hidden floating point, and softcap positive or None."""
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float tensor, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]}) for this hidden"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


class Projector:
    """Writes chunk logits, in the compute dtype, into a reused buffer.

    Reusing buffers across chunks (via `out=`) matters on CPU: every fresh
    vocabulary-sized allocation is a new mmap whose page faults cost a good fraction
    of the arithmetic. When the weight is narrower than the compute dtype (bfloat16),
    the matmul runs in the weight's dtype and the result is upcast into the buffer.
    With a `workspace`, the narrow buffer and the narrowed weight outlive the call.
    """

    def __init__(
        self,
        hidden_dtype: torch.dtype,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        cdtype: torch.dtype,
        rows: int,
        logit_scale: float,
        softcap: float | None,
        matmul_dtype: torch.dtype | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        ws = workspace or Workspace()
        self.cdtype = cdtype
        # Narrow matmuls only when both operands are narrow (as F.linear would run them);
        # otherwise the weight is upcast once per call rather than the hidden state narrowed.
        narrow = weight.dtype not in (torch.float32, torch.float64)
        self.mdtype = weight.dtype if narrow and hidden_dtype == weight.dtype else cdtype
        if matmul_dtype is not None:
            self.mdtype = matmul_dtype
        self.weight = ws.cast("head_weight", weight, self.mdtype)
        self.bias = None if bias is None else bias.to(self.mdtype)
        self.scale = logit_scale
        self.softcap = softcap
        vocab = weight.shape[0]
        self.low = None
        if self.mdtype != cdtype:
            self.low = ws.rows("narrow_chunk", rows, vocab, self.mdtype, weight.device)

    @property
    def narrow(self) -> bool:
        """Whether the matmuls run in a dtype narrower than the compute dtype."""
        return self.low is not None

    def logits(self, h: torch.Tensor, out: torch.Tensor, tanh_out: torch.Tensor | None) -> None:
        """out[:n] = softcap(scale * (h @ W.T + b)); tanh_out, if given, gets tanh(x / cap)."""
        n = h.shape[0]
        h = h.to(self.mdtype)
        target = out if self.low is None else self.low[:n]
        wt = self.weight.t()
        if self.bias is None:
            torch.mm(h, wt, out=target)
        else:
            torch.addmm(self.bias, h, wt, out=target)
        if self.low is not None:
            out.copy_(target)
        if self.scale != 1.0:
            out.mul_(self.scale)
        if self.softcap is not None:
            out.div_(self.softcap).tanh_()
            if tanh_out is not None:
                tanh_out.copy_(out)
            out.mul_(self.softcap)

    def times_weight(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, vocab) compute-dtype rows -> (rows @ W, (n, hidden) in the compute dtype; the
        rows as the matmul saw them, narrowed into the reused buffer when it is narrow)."""
        if self.low is None:
            return rows @ self.weight, rows
        low = self.low[: rows.shape[0]]
        low.copy_(rows)
        return (low @ self.weight).to(self.cdtype), low

    def grad_hidden(self, grad_z: torch.Tensor) -> torch.Tensor:
        """(n, vocab) compute-dtype gradient w.r.t. logits -> (n, hidden) w.r.t. hidden."""
        n = grad_z.shape[0]
        if self.low is None:
            return grad_z @ self.weight
        low = self.low[:n]
        low.copy_(grad_z)
        return low @ self.weight


def grad_through_softcap(gz: torch.Tensor, tanh: torch.Tensor | None, logit_scale: float) -> None:
    """In place: dL/dz (after capping) -> dL/d(h W^T + b), through cap * tanh(x / cap)
    (derivative 1 - tanh^2; `tanh` is overwritten) and the logit scale."""
    if tanh is not None:
        gz.mul_(tanh.mul_(tanh).neg_().add_(1.0))
    if logit_scale != 1.0:
        gz.mul_(logit_scale)
