"""A weighted next-token NLL through a linear head whose gradients are computed in forward.

The loss is linear in its per-row terms and its weights are known before backward, so
each chunk's dL/dlogits = w * (p - onehot(y)) is pushed through the projection while the
chunk is in memory: no logits are recomputed and nothing vocabulary-sized is saved.
Backward only scales the stored gradients by the incoming scalar. Statistics (NLL sum,
entropy sum, argmax-correct count) come from the same chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from posttrain.ops.linear_log_probs import HeadSpec
from posttrain.ops.projection import (
    Projector,
    check_head,
    grad_through_softcap,
    resolve_chunk_size,
)
from posttrain.ops.softmax import compute_dtype, softmax_and_lse
from posttrain.ops.token_ids import check_token_ids
from posttrain.ops.workspace import Workspace


class FusedNLL(NamedTuple):
    """Result of `fused_linear_nll`.

    loss: differentiable scalar, sum_i w_i * -log p(label_i), float32 (float64 for
    float64 inputs). nll_sum, entropy_sum: detached scalars of the same dtype,
    unweighted sums over all rows. num_correct: detached int64 scalar, rows whose
    label has the largest logit (a tie counts as correct). num_tokens: rows.
    """

    loss: Tensor
    nll_sum: Tensor
    entropy_sum: Tensor
    num_correct: Tensor
    num_tokens: int


@dataclass
class _Sums:
    """Running scalar sums over chunks, on the device (no host sync per chunk)."""

    loss: Tensor
    nll: Tensor
    entropy: Tensor
    correct: Tensor

    @classmethod
    def zeros(cls, dtype: torch.dtype, device: torch.device) -> _Sums:
        z = [torch.zeros((), dtype=dtype, device=device) for _ in range(3)]
        return cls(*z, torch.zeros((), dtype=torch.long, device=device))


@dataclass
class _HeadGrads:
    """Gradient accumulators for (hidden, weight, bias); None where none is needed.

    In bf16-matmul mode the weight gradient accumulates narrow in `weight_low` and the
    one-hot rows are kept aside, to be upcast and added once after the last chunk: a
    per-chunk upcast and add of (vocab, hidden) would cost as much as the narrow matmul
    saves.
    """

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    weight_low: Tensor | None = None
    onehot_rows: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None


def _alloc_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    need: tuple[bool, bool, bool],
    cdtype: torch.dtype,
    proj: Projector,
    linear: bool,
    ws: Workspace,
) -> _HeadGrads:
    device = hidden.device
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    # The linear path writes the first chunk's weight gradient whole, so it needs no
    # zero fill (a vocabulary x hidden pass) unless there is no chunk at all.
    alloc = torch.empty if linear and hidden.shape[0] > 0 else torch.zeros
    low = None
    if need_w and proj.narrow:
        low = ws.rows("narrow_weight_grad", *weight.shape, proj.mdtype, device)
    return _HeadGrads(
        hidden=torch.empty_like(hidden) if need_h else None,
        weight=alloc(weight.shape, dtype=cdtype, device=device) if need_w else None,
        bias=torch.zeros(weight.shape[0], dtype=cdtype, device=device) if need_b else None,
        weight_low=low,
    )


def _linear_chunk(
    proj: Projector,
    weight: Tensor,
    bias: Tensor | None,
    h: Tensor,
    y: Tensor,
    w: Tensor,
    p: Tensor,
    lse: Tensor,
    first: bool,
    grads: _HeadGrads,
) -> tuple[Tensor, Tensor | None]:
    """Entropy and gradients of a chunk of a linear (uncapped) head.

    z = s (h W^T + b) is linear in h, so everything goes through pW = p @ W, one
    (n, hidden) matmul: E_p[z] = s (h . pW + p . b) for the entropy, and with
    dL/dz = w (p - onehot(y)) the gradients are s w (pW - W[y]) for h and
    s p^T (w h) - onehot rows for W. No (n, vocab) pass beyond the softmax.
    Returns (entropy (n,), hidden gradient (n, H) in the compute dtype or None).
    """
    cdtype = proj.cdtype
    pw, p_mm = proj.times_weight(p)
    mean_z = (h.to(cdtype) * pw).sum(dim=1)
    if bias is not None:
        mean_z += p @ bias.to(cdtype)
    entropy = lse - proj.scale * mean_z
    if not grads.any:
        return entropy, None
    sw = proj.scale * w
    grad_h = None
    if grads.hidden is not None:
        grad_h = sw[:, None] * (pw - weight.index_select(0, y).to(cdtype))
    if grads.weight is not None:
        wh = sw[:, None] * h.to(cdtype)
        if grads.weight_low is None:
            if first:
                torch.mm(p_mm.t(), wh, out=grads.weight)
            else:
                grads.weight.addmm_(p_mm.t(), wh)
            grads.weight.index_add_(0, y, -wh)
        else:
            wh_low = wh.to(proj.mdtype)
            if first:
                torch.mm(p_mm.t(), wh_low, out=grads.weight_low)
            else:
                grads.weight_low.addmm_(p_mm.t(), wh_low)
            grads.onehot_rows.append((y, -wh))
    if grads.bias is not None:
        grads.bias.addmv_(p.t(), sw)
        grads.bias.index_add_(0, y, -sw)
    return entropy, grad_h


def _softcap_chunk(
    proj: Projector,
    h: Tensor,
    y: Tensor,
    w: Tensor,
    z: Tensor,
    p: Tensor,
    t: Tensor | None,
    lse: Tensor,
    grads: _HeadGrads,
) -> tuple[Tensor, Tensor | None]:
    """Entropy and gradients of a chunk of a soft-capped head, from the chunk itself.

    z and p are overwritten (z becomes p * z for the entropy, p becomes dL/dz).
    Returns (entropy (n,), hidden gradient (n, H) or None).
    """
    entropy = lse - z.mul_(p).sum(dim=1)
    if not grads.any:
        return entropy, None
    gz = p.mul_(w[:, None])
    gz.scatter_add_(1, y[:, None], -w[:, None])
    grad_through_softcap(gz, t, proj.scale)
    grad_h = proj.grad_hidden(gz) if grads.hidden is not None else None
    if grads.weight is not None:
        if grads.weight_low is None:
            grads.weight.addmm_(gz.t(), h.to(proj.cdtype))
        else:
            low = proj.low[: h.shape[0]]
            low.copy_(gz)
            torch.mm(low.t(), h.to(proj.mdtype), out=grads.weight_low)
            grads.weight += grads.weight_low
    if grads.bias is not None:
        grads.bias += gz.sum(dim=0)
    return entropy, grad_h


def fused_nll_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    token_weights: Tensor,
    spec: HeadSpec,
    matmul_dtype: torch.dtype | None,
    need: tuple[bool, bool, bool],
    workspace: Workspace | None = None,
) -> tuple[_Sums, _HeadGrads]:
    """Loss, statistics and (where `need` says) gradients, chunk by chunk.

    hidden: (N, H); labels: (N,) int64; token_weights: (N,). Returns the sums (loss,
    nll, entropy in the compute dtype; correct int64) and the gradient accumulators.
    The chunk buffers come from `workspace` (fresh ones without).
    """
    ws = workspace or Workspace()
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cdtype = compute_dtype(hidden.dtype, weight.dtype)
    device = hidden.device
    rows, softcap = spec.rows, spec.softcap
    w_rows = token_weights.to(cdtype)
    proj = Projector(
        hidden.dtype, weight, bias, cdtype, rows, spec.logit_scale, softcap, matmul_dtype, ws
    )
    sums = _Sums.zeros(cdtype, device)
    grads = _alloc_grads(hidden, weight, bias, need, cdtype, proj, softcap is None, ws)
    buf = ws.rows("logits", rows, vocab, cdtype, device)
    pbuf = ws.rows("probs", rows, vocab, cdtype, device)
    tbuf = None if softcap is None else ws.rows("tanh", rows, vocab, cdtype, device)
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        n = r1 - r0
        h, y, w = hidden[r0:r1], labels[r0:r1], w_rows[r0:r1]
        z, t = buf[:n], None if tbuf is None else tbuf[:n]
        proj.logits(h, z, t)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        sums.correct += (z_y >= z.amax(dim=1)).sum()
        p, lse, _ = softmax_and_lse(z, y, pbuf[:n])
        nll = lse - z_y
        sums.nll += nll.sum()
        sums.loss += (w * nll).sum()
        if softcap is None:
            entropy, grad_h = _linear_chunk(proj, weight, bias, h, y, w, p, lse, r0 == 0, grads)
        else:
            entropy, grad_h = _softcap_chunk(proj, h, y, w, z, p, t, lse, grads)
        sums.entropy += entropy.sum()
        if grad_h is not None:
            grads.hidden[r0:r1] = grad_h.to(hidden.dtype)
    if grads.onehot_rows:
        grads.weight.copy_(grads.weight_low)
        for y, neg_wh in grads.onehot_rows:
            grads.weight.index_add_(0, y, neg_wh)
    return sums, grads


class _FusedLinearNLL(torch.autograd.Function):
    """Adapter: `fused_nll_forward` in forward; backward scales the stored gradients.

    Outputs (loss, nll_sum, entropy_sum, num_correct); only the loss is differentiable.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        token_weights: Tensor,
        spec: HeadSpec,
        matmul_dtype: torch.dtype | None,
        grad_enabled: bool,
        workspace: Workspace | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Under no_grad (evaluation) no gradient work is done at all.
        need = tuple(grad_enabled and n for n in ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            sums, grads = fused_nll_forward(
                hidden, weight, bias, labels, token_weights, spec, matmul_dtype, need, workspace
            )
        ctx.grads = (
            grads.hidden,
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype),
        )
        ctx.mark_non_differentiable(sums.nll, sums.entropy, sums.correct)
        return sums.loss, sums.nll, sums.entropy, sums.correct

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_nll frees its stored gradients in the first backward; "
                "call backward through it only once"
            )
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*scaled, None, None, None, None, None, None)


def fused_linear_nll(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    token_weights: Tensor,
    *,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    matmul_dtype: torch.dtype | None = None,
    budget_bytes: int | None = None,
    workspace: Workspace | None = None,
) -> FusedNLL:
    """Weighted next-token NLL through a linear head, gradients computed in forward.

    hidden: (N, H) any float dtype (typically the response positions only);
    weight: (V, H); bias: (V,) or None; labels: (N,) integers in [0, V) (else
    ValueError); token_weights: (N,) float, the per-token loss weights (e.g. mask
    / normaliser). logits = softcap(logit_scale * (hidden @ weight.T + bias)) are
    formed `chunk_size` rows at a time and upcast to float32; `matmul_dtype`
    (e.g. torch.bfloat16) runs the three projection matmuls in that dtype.

    The returned `loss` backpropagates to hidden, weight and bias; its gradients
    are computed during this call and are exact for the float32 path. Call
    backward through it at most once. Statistics come from the same chunks.

    `workspace` keeps the chunk buffers (and the narrowed weight) for the next call,
    which on CPU saves their page faults; without one, they are allocated afresh.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, H) and labels (N,); got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if token_weights.shape != labels.shape:
        raise ValueError(
            f"token_weights {tuple(token_weights.shape)} must match labels {tuple(labels.shape)}"
        )
    if not hidden.dtype.is_floating_point or not token_weights.dtype.is_floating_point:
        raise ValueError(
            f"hidden and token_weights must be float, got {hidden.dtype}, {token_weights.dtype}"
        )
    check_head(hidden, weight, bias, softcap)
    if matmul_dtype is not None and not matmul_dtype.is_floating_point:
        raise ValueError(f"matmul_dtype must be a float dtype, got {matmul_dtype}")
    check_token_ids("labels", labels, weight.shape[0])
    chunk = resolve_chunk_size(chunk_size, weight, matmul_dtype or hidden.dtype, budget_bytes)
    n_rows = hidden.shape[0]
    spec = HeadSpec(max(1, min(chunk, n_rows)), float(logit_scale), softcap)
    loss, nll_sum, entropy_sum, num_correct = _FusedLinearNLL.apply(
        hidden,
        weight,
        bias,
        labels.long(),
        token_weights.detach(),
        spec,
        matmul_dtype,
        torch.is_grad_enabled(),
        workspace,
    )
    return FusedNLL(loss, nll_sum, entropy_sum, num_correct, n_rows)
