"""Memory-lean per-token log-probs and entropy through the output projection.

For a real model the largest tensors of a training step are the logits, not the
weights: 8 x 2,048 tokens x Qwen2.5's 151,936-entry vocabulary is 2.5 billion
floats, 10 GB in float32, and a `log_softmax` copy (plus two more for entropy)
multiplies that. This module never builds the (batch, seq, vocab) tensor. It runs
the model's body to get the final hidden states, then pushes a chunk of rows at a
time through the output projection inside a custom `torch.autograd.Function`
that keeps only per-token statistics (log-sum-exp and entropy) and recomputes
each chunk's logits in backward. Peak extra memory is a couple of chunks of
logits. Everything is plain PyTorch, so it runs on every device, and it gives
exact gradients for the entropy as well as the log-probs.

Two entry points:

* `chunked_log_probs` / `lean_response_log_probs`: per-token log-probs (and
  entropy) with gradients, the lean path behind `get_response_log_probs`.
* `fused_linear_nll`: a training loss whose gradients are computed during the
  forward pass, chunk by chunk (no recomputation at all), with NLL, entropy and
  accuracy statistics taken from the same chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from posttrain.primitives import check_token_ids

logger = logging.getLogger("posttrain")

# Working-set budget for one chunk's logits (and their scratch copies). With two
# float32 (rows, vocab) buffers this gives 256 rows for Qwen2.5's 151,936 vocabulary:
# measured on CPU, 128-row chunks were clearly slower and 1,024-row chunks missed
# the memory target.
DEFAULT_BUDGET_BYTES = 320 * 2**20

# CausalLM classes whose forward is `logits = lm_head(body(...).last_hidden_state)`,
# optionally followed by a transform the chunked path reproduces exactly:
#   "plain"   nothing after the projection
#   "softcap" Gemma 2/3: cap * tanh(logits / cap), cap = config.final_logit_softcapping
#   "scale"   Cohere: logits * config.logit_scale
#   "divide"  Granite: logits / config.logits_scaling
# Each entry is checked against the model's own logits in tests/test_chunked.py.
_HEAD_FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "plain",
    "Qwen2ForCausalLM": "plain",
    "Qwen3ForCausalLM": "plain",
    "Qwen2MoeForCausalLM": "plain",
    "Qwen3MoeForCausalLM": "plain",
    "MistralForCausalLM": "plain",
    "MixtralForCausalLM": "plain",
    "GemmaForCausalLM": "plain",
    "Gemma2ForCausalLM": "softcap",
    "Gemma3ForCausalLM": "softcap",
    "PhiForCausalLM": "plain",
    "Phi3ForCausalLM": "plain",
    "Starcoder2ForCausalLM": "plain",
    "OlmoForCausalLM": "plain",
    "Olmo2ForCausalLM": "plain",
    "GPTNeoXForCausalLM": "plain",
    "SmolLM3ForCausalLM": "plain",
    "CohereForCausalLM": "scale",
    "GraniteForCausalLM": "divide",
}

# Below this a label's probability has lost relative precision (float32 subnormals
# start at 1.2e-38), so its row's log-sum-exp is recomputed directly.
_TINY_PROB = 1e-30

_fallback_logged: set[str] = set()


def _log_fallback_once(key: str, message: str) -> None:
    if key not in _fallback_logged:
        _fallback_logged.add(key)
        logger.warning("%s; using the full-logits path for log-probs", message)


@dataclass(frozen=True)
class LinearHead:
    """A model's output head in the form the chunked path computes.

    logits = softcap(logit_scale * (hidden @ weight.T + bias)), where
    softcap(x) = cap * tanh(x / cap) when `softcap` is set and the identity otherwise.

    weight: (vocab, hidden) parameter; bias: (vocab,) parameter or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def find_linear_head(model: nn.Module) -> LinearHead | None:
    """The model's output head if the chunked path can compute it exactly, else None.

    Supported: the transformers CausalLM classes in an allow-list whose forward is
    `lm_head(hidden)` (tied or untied, with or without bias), Gemma 2/3's final-logit
    soft-capping and Cohere/Granite's logit scale, which are applied inside each
    chunk. Anything else (an unknown architecture, a subclass defined outside
    transformers, a head that is not a plain `nn.Linear` such as a LoRA or quantised
    layer) returns None and logs once why, so the caller uses the full-logits path.
    """
    cls = type(model)
    name = cls.__name__
    kind = _HEAD_FAMILIES.get(name)
    if kind is None or not cls.__module__.startswith("transformers.models."):
        _log_fallback_once(
            f"arch:{cls.__module__}.{name}",
            f"posttrain: lean log-probs do not know the output head of {name}",
        )
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear:
        _log_fallback_once(
            f"head:{name}:{type(head).__name__}",
            f"posttrain: the output head of {name} is {type(head).__name__}, not a plain nn.Linear",
        )
        return None
    config = getattr(model, "config", None)
    scale, cap = 1.0, None
    if kind == "softcap":
        raw_cap = getattr(config, "final_logit_softcapping", None)
        cap = float(raw_cap) if raw_cap else None
    elif kind == "scale":
        scale = float(config.logit_scale)
    elif kind == "divide":
        scale = 1.0 / float(config.logits_scaling)
    return LinearHead(weight=head.weight, bias=head.bias, logit_scale=scale, softcap=cap)


def body_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The final hidden states (after the last norm), without computing any logits.

    input_ids: (batch, seq) int64; attention_mask: (batch, seq) or None.
    Returns (batch, seq, hidden) in the body's output dtype.
    """
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is model:
        body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


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


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


class _Projector:
    """Writes chunk logits, in the compute dtype, into a reused buffer.

    Reusing buffers across chunks (via `out=`) matters on CPU: every fresh
    vocabulary-sized allocation is a new mmap whose page faults cost as much as
    the arithmetic. When the weight is narrower than the compute dtype (bfloat16),
    the matmul runs in the weight's dtype and the result is upcast into the buffer.
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
    ) -> None:
        self.cdtype = cdtype
        # Narrow matmuls only when both operands are narrow (as F.linear would run them);
        # otherwise the weight is upcast once per call rather than the hidden state narrowed.
        narrow = weight.dtype not in (torch.float32, torch.float64)
        self.mdtype = weight.dtype if narrow and hidden_dtype == weight.dtype else cdtype
        if matmul_dtype is not None:
            self.mdtype = matmul_dtype
        self.weight = weight.to(self.mdtype)
        self.bias = None if bias is None else bias.to(self.mdtype)
        self.scale = logit_scale
        self.softcap = softcap
        vocab = weight.shape[0]
        self.low = None
        if self.mdtype != cdtype:
            self.low = torch.empty(rows, vocab, dtype=self.mdtype, device=weight.device)

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


def _chunk_stats(
    z: torch.Tensor, labels: torch.Tensor, scratch: torch.Tensor, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-sum-exp, label logit and (if asked) entropy of each row of z.

    z: (n, vocab) logits; scratch: (n, vocab) buffer, overwritten.
    Returns (lse, label_logit, entropy or None) of shape (n,) each.
    """
    label_logit = z.gather(1, labels[:, None]).squeeze(1)
    # One fused softmax pass instead of separate max/sub/exp passes over the chunk
    # (on CPU each elementwise pass costs a good fraction of the matmul). Then
    # lse = z_y - log p_y, exact unless p_y underflows; those rare rows are redone.
    p = torch.softmax(z, dim=1, out=scratch)
    p_label = p.gather(1, labels[:, None]).squeeze(1)
    lse = label_logit - p_label.log()
    tiny = p_label < _TINY_PROB
    if bool(tiny.any()):
        lse[tiny] = torch.logsumexp(z[tiny], dim=1)
    if not entropy:
        return lse, label_logit, None
    mean_z = p.mul_(z).sum(dim=1)
    return lse, label_logit, lse - mean_z


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        return_entropy: bool,
        chunk_size: int,
        logit_scale: float,
        softcap: float | None,
    ) -> tuple[torch.Tensor, ...]:
        n_rows = hidden.shape[0]
        vocab = weight.shape[0]
        cdtype = _compute_dtype(hidden.dtype, weight.dtype)
        rows = max(1, min(chunk_size, n_rows))
        log_probs = torch.empty(n_rows, dtype=cdtype, device=hidden.device)
        lse = torch.empty_like(log_probs)
        entropy = torch.empty_like(log_probs) if return_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            proj = _Projector(hidden.dtype, weight, bias, cdtype, rows, logit_scale, softcap)
            buf = torch.empty(rows, vocab, dtype=cdtype, device=hidden.device)
            scratch = torch.empty_like(buf)
            for r0 in range(0, n_rows, rows):
                r1 = min(r0 + rows, n_rows)
                n = r1 - r0
                z = buf[:n]
                proj.logits(hidden[r0:r1], z, None)
                c_lse, c_label, c_ent = _chunk_stats(z, labels[r0:r1], scratch[:n], return_entropy)
                lse[r0:r1] = c_lse
                log_probs[r0:r1] = c_label - c_lse
                if entropy is not None:
                    entropy[r0:r1] = c_ent
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.rows = rows
        ctx.logit_scale = logit_scale
        ctx.softcap = softcap
        ctx.return_entropy = return_entropy
        if entropy is None:
            return (log_probs,)
        return log_probs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        g_lp = grads[0]
        g_ent = grads[1] if ctx.return_entropy else None
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        cdtype = lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_w else None
        )
        grad_bias = torch.zeros(vocab, dtype=cdtype, device=weight.device) if need_b else None
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None

        zeros = torch.zeros(n_rows, dtype=cdtype, device=hidden.device)
        g_lp = zeros if g_lp is None else g_lp.to(cdtype)
        g_ent = zeros if g_ent is None else g_ent.to(cdtype)
        # Prompt and padding rows have zero incoming gradient for both outputs;
        # skipping them before the matmuls halves the backward cost of a typical SFT batch.
        active = ((g_lp != 0) | (g_ent != 0)).nonzero().squeeze(1)
        n_active = active.numel()
        all_active = n_active == n_rows
        use_entropy = ctx.return_entropy and bool((g_ent != 0).any())

        with torch.autocast(hidden.device.type, enabled=False):
            rows = min(ctx.rows, max(n_active, 1))
            proj = _Projector(
                hidden.dtype, weight, bias, cdtype, rows, ctx.logit_scale, ctx.softcap
            )
            buf = torch.empty(rows, vocab, dtype=cdtype, device=hidden.device)
            pbuf = torch.empty_like(buf)
            tbuf = torch.empty_like(buf) if ctx.softcap is not None else None
            for a0 in range(0, n_active, rows):
                a1 = min(a0 + rows, n_active)
                n = a1 - a0
                if all_active:
                    sel: slice | torch.Tensor = slice(a0, a1)
                    h = hidden[a0:a1]
                else:
                    sel = active[a0:a1]
                    h = hidden.index_select(0, sel)
                c_glp, c_lse, c_labels = g_lp[sel], lse[sel], labels[sel]
                z = buf[:n]
                t = None if tbuf is None else tbuf[:n]
                proj.logits(h, z, t)
                logp = z.sub_(c_lse[:, None])
                p = torch.exp(logp, out=pbuf[:n])
                if use_entropy:
                    # d(log p_y)/dz = onehot(y) - p;  dH/dz = -p * (log p + H), so
                    # dL/dz = onehot * g_lp - p * (g_lp + g_ent * H + g_ent * log p).
                    c_gent = g_ent[sel]
                    a = -(c_glp + c_gent * entropy[sel])
                    gz = torch.addcmul(a[:, None], logp, -c_gent[:, None], out=logp).mul_(p)
                else:
                    gz = p.mul_(-c_glp[:, None])
                gz.scatter_add_(1, c_labels[:, None], c_glp[:, None])
                if t is not None:
                    # d(cap * tanh(x / cap))/dx = 1 - tanh(x / cap)^2.
                    gz.mul_(t.mul_(t).neg_().add_(1.0))
                if ctx.logit_scale != 1.0:
                    gz.mul_(ctx.logit_scale)
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
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


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
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]}) for this hidden"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float tensor, got {hidden.dtype}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    vocab, width = weight.shape
    check_token_ids("labels", labels, vocab)
    if chunk_size is None:
        budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
        chunk_size = default_chunk_size(vocab, width, hidden.dtype, budget)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    flat_h = hidden.reshape(-1, width)
    flat_y = labels.reshape(-1).long()
    if flat_h.shape[0] == 0:
        cdtype = _compute_dtype(hidden.dtype, weight.dtype)
        empty = flat_h.sum(dim=1).to(cdtype) + 0 * weight.sum().to(cdtype)
        return empty.reshape(labels.shape), empty.reshape(labels.shape) if return_entropy else None
    outs = _ChunkedLogProbs.apply(
        flat_h, weight, bias, flat_y, return_entropy, int(chunk_size), float(logit_scale), softcap
    )
    log_probs = outs[0].reshape(labels.shape)
    entropy = outs[1].reshape(labels.shape) if return_entropy else None
    return log_probs, entropy


def lean_response_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    return_token_entropy: bool = False,
    chunk_size: int | None = None,
    budget_bytes: int | None = None,
) -> dict[str, torch.Tensor] | None:
    """`get_response_log_probs` without materialising the (batch, seq, vocab) logits.

    input_ids, labels: (B, T) int64, labels already shifted (labels[b, t] is the token
    predicted at position t) and each in [0, vocab). Returns {"log_probs": (B, T)
    float32} plus "token_entropy": (B, T) float32 when asked, or None when the model's
    head is not one `find_linear_head` supports (the caller then uses full logits).
    """
    head = find_linear_head(model)
    if head is None:
        return None
    hidden = body_hidden_states(model, input_ids, attention_mask)
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
    return out


class FusedNLL(NamedTuple):
    """Result of `fused_linear_nll`.

    loss: differentiable scalar, sum_i w_i * -log p(label_i), float32 (float64 for
    float64 inputs). nll_sum, entropy_sum: detached scalars of the same dtype,
    unweighted sums over all rows. num_correct: detached int64 scalar, rows whose
    label has the largest logit (a tie counts as correct). num_tokens: rows.
    """

    loss: torch.Tensor
    nll_sum: torch.Tensor
    entropy_sum: torch.Tensor
    num_correct: torch.Tensor
    num_tokens: int


class _FusedLinearNLL(torch.autograd.Function):
    """Weighted NLL whose gradients are computed in forward, chunk by chunk.

    The loss is linear in its per-row terms and known before backward, so each
    chunk's dL/dlogits = w * (p - onehot(y)) is pushed through the projection while
    the chunk is in memory: no logits are recomputed and nothing vocabulary-sized is
    saved. Backward only scales the stored gradients by the incoming scalar.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        token_weights: torch.Tensor,
        rows: int,
        logit_scale: float,
        softcap: float | None,
        matmul_dtype: torch.dtype | None,
        stats: list[torch.Tensor],
        grad_enabled: bool,
    ) -> torch.Tensor:
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        cdtype = _compute_dtype(hidden.dtype, weight.dtype)
        # Under no_grad (evaluation) no gradient work is done at all.
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        need_b = need_b and bias is not None
        w_rows = token_weights.to(cdtype)
        device = hidden.device
        loss = torch.zeros((), dtype=cdtype, device=device)
        nll_sum = torch.zeros((), dtype=cdtype, device=device)
        ent_sum = torch.zeros((), dtype=cdtype, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # The linear path writes the first chunk's weight gradient whole, so it needs no
        # zero fill (a vocabulary x hidden pass) unless there is no chunk at all.
        alloc = torch.empty if softcap is None and n_rows > 0 else torch.zeros
        grad_weight = alloc(weight.shape, dtype=cdtype, device=device) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=cdtype, device=device) if need_b else None
        with torch.autocast(device.type, enabled=False):
            proj = _Projector(
                hidden.dtype, weight, bias, cdtype, rows, logit_scale, softcap, matmul_dtype
            )
            narrow = proj.mdtype != cdtype
            buf = torch.empty(rows, vocab, dtype=cdtype, device=device)
            pbuf = torch.empty_like(buf)
            tbuf = torch.empty_like(buf) if softcap is not None else None
            gw_low = None
            if need_w and narrow:
                gw_low = torch.empty(weight.shape, dtype=proj.mdtype, device=device)
            onehot_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
            for r0 in range(0, n_rows, rows):
                r1 = min(r0 + rows, n_rows)
                n = r1 - r0
                h, y, w = hidden[r0:r1], labels[r0:r1], w_rows[r0:r1]
                z = buf[:n]
                t = None if tbuf is None else tbuf[:n]
                proj.logits(h, z, t)
                z_y = z.gather(1, y[:, None]).squeeze(1)
                correct += (z_y >= z.amax(dim=1)).sum()
                p = torch.softmax(z, dim=1, out=pbuf[:n])
                p_y = p.gather(1, y[:, None]).squeeze(1)
                lse = z_y - p_y.log()
                tiny = p_y < _TINY_PROB
                if bool(tiny.any()):
                    lse[tiny] = torch.logsumexp(z[tiny], dim=1)
                nll = lse - z_y
                nll_sum += nll.sum()
                loss += (w * nll).sum()
                if softcap is None:
                    # z = s (h W^T + b) is linear in h, so everything left goes through
                    # pW = p @ W, one (n, hidden) matmul: E_p[z] = s (h . pW + p . b) for the
                    # entropy, and with dL/dz = w (p - onehot(y)) the gradients are
                    # s w (pW - W[y]) for h, s p^T (w h) - onehot rows for W. No (n, vocab)
                    # pass beyond the softmax.
                    pw, p_mm = proj.times_weight(p)
                    mean_z = (h.to(cdtype) * pw).sum(dim=1)
                    if bias is not None:
                        mean_z += p @ bias.to(cdtype)
                    ent_sum += (lse - logit_scale * mean_z).sum()
                    if not (need_h or need_w or need_b):
                        continue
                    sw = logit_scale * w
                    if grad_hidden is not None:
                        w_y = weight.index_select(0, y).to(cdtype)
                        grad_hidden[r0:r1] = (sw[:, None] * (pw - w_y)).to(hidden.dtype)
                    if grad_weight is not None:
                        wh = sw[:, None] * h.to(cdtype)
                        if gw_low is None and r0 == 0:
                            torch.mm(p_mm.t(), wh, out=grad_weight)
                        elif gw_low is None:
                            grad_weight.addmm_(p_mm.t(), wh)
                        elif r0 == 0:
                            torch.mm(p_mm.t(), wh.to(proj.mdtype), out=gw_low)
                        else:
                            # Accumulated narrow and upcast once after the last chunk: a
                            # per-chunk upcast and add of (vocab, hidden) would cost as much
                            # as the narrow matmul saves.
                            gw_low.addmm_(p_mm.t(), wh.to(proj.mdtype))
                        if gw_low is None:
                            grad_weight.index_add_(0, y, -wh)
                        else:
                            onehot_rows.append((y, -wh))
                    if grad_bias is not None:
                        grad_bias.addmv_(p.t(), sw)
                        grad_bias.index_add_(0, y, -sw)
                    continue
                # Soft-capped logits: the entropy and dL/dz from the chunk itself.
                # z is not needed after this: it becomes p * z for the entropy.
                ent_sum += (lse - z.mul_(p).sum(dim=1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                # dL/dz = w * (p - onehot(y)), then through soft-capping and scale.
                gz = p.mul_(w[:, None])
                gz.scatter_add_(1, y[:, None], -w[:, None])
                gz.mul_(t.mul_(t).neg_().add_(1.0))
                if logit_scale != 1.0:
                    gz.mul_(logit_scale)
                if grad_hidden is not None:
                    grad_hidden[r0:r1] = proj.grad_hidden(gz).to(hidden.dtype)
                if grad_weight is not None:
                    if gw_low is None:
                        grad_weight.addmm_(gz.t(), h.to(cdtype))
                    else:
                        low = proj.low[:n]
                        low.copy_(gz)
                        torch.mm(low.t(), h.to(proj.mdtype), out=gw_low)
                        grad_weight += gw_low
                if grad_bias is not None:
                    grad_bias += gz.sum(dim=0)
        if onehot_rows:
            grad_weight.copy_(gw_low)
            for y, neg_wh in onehot_rows:
                grad_weight.index_add_(0, y, neg_wh)
        stats.extend([nll_sum, ent_sum, correct])
        ctx.grads = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_nll frees its stored gradients in the first backward; "
                "call backward through it only once"
            )
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*scaled, None, None, None, None, None, None, None, None)


def fused_linear_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    matmul_dtype: torch.dtype | None = None,
    budget_bytes: int | None = None,
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
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[1]})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if matmul_dtype is not None and not matmul_dtype.is_floating_point:
        raise ValueError(f"matmul_dtype must be a float dtype, got {matmul_dtype}")
    vocab, width = weight.shape
    check_token_ids("labels", labels, vocab)
    if chunk_size is None:
        budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
        chunk_size = default_chunk_size(vocab, width, matmul_dtype or hidden.dtype, budget)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    n_rows = hidden.shape[0]
    stats: list[torch.Tensor] = []
    loss = _FusedLinearNLL.apply(
        hidden,
        weight,
        bias,
        labels.long(),
        token_weights.detach(),
        max(1, min(int(chunk_size), n_rows)),
        float(logit_scale),
        softcap,
        matmul_dtype,
        stats,
        torch.is_grad_enabled(),
    )
    nll_sum, entropy_sum, num_correct = stats
    return FusedNLL(loss, nll_sum, entropy_sum, num_correct, n_rows)
