"""Per-token log-probs and entropy through a linear head, chunked, with exact gradients.

Forward keeps only per-token statistics (log-sum-exp and entropy); backward recomputes
each chunk's logits and skips rows whose incoming gradients are zero, so peak extra
memory is a couple of chunks of logits, never (tokens, vocab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from posttrain.ops.projection import (
    Projector,
    check_head,
    grad_through_softcap,
    resolve_chunk_size,
)
from posttrain.ops.softmax import compute_dtype, softmax_and_lse
from posttrain.ops.token_ids import check_token_ids


@dataclass(frozen=True)
class HeadSpec:
    """How logits are formed from hidden states, besides the weight and bias."""

    rows: int
    logit_scale: float = 1.0
    softcap: float | None = None


def log_probs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    spec: HeadSpec,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log_probs, lse, entropy or None), each (N,) in the compute dtype, for hidden (N, H)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cdtype = compute_dtype(hidden.dtype, weight.dtype)
    rows = max(1, min(spec.rows, n_rows))
    log_probs = torch.empty(n_rows, dtype=cdtype, device=hidden.device)
    lse = torch.empty_like(log_probs)
    entropy = torch.empty_like(log_probs) if return_entropy else None
    proj = Projector(hidden.dtype, weight, bias, cdtype, rows, spec.logit_scale, spec.softcap)
    buf = torch.empty(rows, vocab, dtype=cdtype, device=hidden.device)
    scratch = torch.empty_like(buf)
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        z = buf[: r1 - r0]
        proj.logits(hidden[r0:r1], z, None)
        p, c_lse, c_label = softmax_and_lse(z, labels[r0:r1], scratch[: r1 - r0])
        lse[r0:r1] = c_lse
        log_probs[r0:r1] = c_label - c_lse
        if entropy is not None:
            entropy[r0:r1] = c_lse - p.mul_(z).sum(dim=1)
    return log_probs, lse, entropy


def _grad_logits(
    z: torch.Tensor,
    p_buf: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> torch.Tensor:
    """dL/dz of a chunk from its logits z (overwritten) and the incoming gradients.

    d(log p_y)/dz = onehot(y) - p and dH/dz = -p (log p + H), so
    dL/dz = onehot * g_lp - p * (g_lp + g_ent * H + g_ent * log p).
    The entropy term needs log p and p side by side (`p_buf`, same shape as z);
    without it p overwrites z, so the chunk costs one vocabulary-sized buffer.
    """
    logp = z.sub_(lse[:, None])
    if g_ent is not None and entropy is not None and p_buf is not None:
        p = torch.exp(logp, out=p_buf)
        a = -(g_lp + g_ent * entropy)
        gz = torch.addcmul(a[:, None], logp, -g_ent[:, None], out=logp).mul_(p)
    else:
        gz = logp.exp_().mul_(-g_lp[:, None])
    return gz.scatter_add_(1, labels[:, None], g_lp[:, None])


def log_probs_backward(
    saved: tuple[torch.Tensor, ...],
    spec: HeadSpec,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for (hidden, weight, bias) from the saved forward tensors
    (hidden, weight, bias, labels, lse, entropy) and the incoming (N,) gradients."""
    hidden, weight, bias, labels, lse, entropy = saved
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cdtype = lse.dtype
    device = hidden.device
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, dtype=cdtype, device=device) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=cdtype, device=device) if need_b else None
    zeros = torch.zeros(n_rows, dtype=cdtype, device=device)
    g_lp = zeros if g_lp is None else g_lp.to(cdtype)
    g_ent = zeros if g_ent is None else g_ent.to(cdtype)
    # Prompt and padding rows have zero incoming gradient for both outputs; skipping
    # them before the matmuls halves the backward cost of a typical SFT batch.
    active = ((g_lp != 0) | (g_ent != 0)).nonzero().squeeze(1)
    n_active = active.numel()
    all_active = n_active == n_rows
    use_entropy = entropy is not None and bool((g_ent != 0).any())
    rows = min(spec.rows, max(n_active, 1))
    proj = Projector(hidden.dtype, weight, bias, cdtype, rows, spec.logit_scale, spec.softcap)
    buf = torch.empty(rows, vocab, dtype=cdtype, device=device)
    # Without an entropy gradient (log-probs alone: DPO, a policy gradient without an
    # entropy bonus) the second buffer is never touched, so it is not allocated.
    pbuf = torch.empty_like(buf) if use_entropy else None
    tbuf = torch.empty_like(buf) if spec.softcap is not None else None
    for a0 in range(0, n_active, rows):
        a1 = min(a0 + rows, n_active)
        n = a1 - a0
        sel: slice | torch.Tensor = slice(a0, a1) if all_active else active[a0:a1]
        h = hidden[a0:a1] if all_active else hidden.index_select(0, sel)
        t = None if tbuf is None else tbuf[:n]
        proj.logits(h, buf[:n], t)
        gz = _grad_logits(
            buf[:n],
            None if pbuf is None else pbuf[:n],
            labels[sel],
            lse[sel],
            g_lp[sel],
            g_ent[sel] if use_entropy else None,
            entropy[sel] if use_entropy else None,
        )
        grad_through_softcap(gz, t, spec.logit_scale)
        if grad_hidden is not None:
            gh = proj.grad_hidden(gz).to(hidden.dtype)
            if all_active:
                grad_hidden[a0:a1] = gh
            else:
                grad_hidden.index_copy_(0, sel, gh)
        if grad_weight is not None:
            grad_weight.addmm_(gz.t(), h.to(cdtype))
        if grad_bias is not None:
            grad_bias += gz.sum(dim=0)
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


class _LinearLogProbs(torch.autograd.Function):
    """Adapter: `log_probs_forward` / `log_probs_backward`."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        spec: HeadSpec,
        return_entropy: bool,
    ) -> tuple[torch.Tensor, ...]:
        with torch.autocast(hidden.device.type, enabled=False):
            log_probs, lse, entropy = log_probs_forward(
                hidden, weight, bias, labels, spec, return_entropy
            )
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.spec = spec
        ctx.return_entropy = return_entropy
        return (log_probs,) if entropy is None else (log_probs, entropy)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return None, None, None, None, None, None
        g_ent = grads[1] if ctx.return_entropy else None
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            g_h, g_w, g_b = log_probs_backward(ctx.saved_tensors, ctx.spec, grads[0], g_ent, need)
        return g_h, g_w, g_b, None, None, None


def chunked_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    budget_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(label) and entropy of softcap(scale * (hidden @ weight.T + bias)).

    hidden: (N, H) or (B, T, H), any float dtype; weight: (V, H); bias: (V,) or None;
    labels: integer tensor shaped like hidden without its last dimension, each in
    [0, V) (else ValueError). Returns (log_probs, entropy or None), both shaped like
    labels, in float32 (float64 when hidden or weight is float64). Logits are formed
    `chunk_size` rows at a time and upcast to float32 per chunk; the default chunk
    size comes from `default_chunk_size` and `budget_bytes`. Gradients flow to
    hidden, weight and bias exactly; backward recomputes each chunk's logits and
    skips rows whose incoming gradients are all zero.
    """
    if hidden.dim() < 1 or hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} plus a hidden dim"
        )
    check_head(hidden, weight, bias, softcap)
    vocab, width = weight.shape
    check_token_ids("labels", labels, vocab)
    rows = resolve_chunk_size(chunk_size, weight, hidden.dtype, budget_bytes)
    flat_h = hidden.reshape(-1, width)
    flat_y = labels.reshape(-1).long()
    if flat_h.shape[0] == 0:
        cdtype = compute_dtype(hidden.dtype, weight.dtype)
        empty = flat_h.sum(dim=1).to(cdtype) + 0 * weight.sum().to(cdtype)
        return empty.reshape(labels.shape), empty.reshape(labels.shape) if return_entropy else None
    spec = HeadSpec(rows, float(logit_scale), softcap)
    outs = _LinearLogProbs.apply(flat_h, weight, bias, flat_y, spec, return_entropy)
    log_probs = outs[0].reshape(labels.shape)
    entropy = outs[1].reshape(labels.shape) if return_entropy else None
    return log_probs, entropy
