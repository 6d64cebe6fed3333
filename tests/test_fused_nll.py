"""The fused NLL kernel (gradients computed in forward) against the straightforward path."""

from __future__ import annotations

import pytest
import torch
from helpers import grads_of, leaf, make, reference_logits, relative_error

from posttrain.ops.fused_nll import fused_linear_nll
from posttrain.ops.workspace import Workspace

# --------------------------------------------------------------------------- fused NLL


def reference_nll(hidden, weight, bias, labels, token_weights, scale=1.0, softcap=None):
    """Straightforward path: full logits, log_softmax, weighted sum; plus the statistics."""
    logits = reference_logits(hidden, weight, bias, scale, softcap)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    correct = (logits.argmax(-1) == labels).sum()
    return (token_weights * nll).sum(), nll.sum(), entropy.sum(), correct


@pytest.mark.parametrize(
    ("scale", "softcap", "chunk"), [(1.0, None, 3), (0.6, 1.5, 2), (1, None, 1), (0.6, None, 2)]
)
def test_fused_nll_float64_exact(scale: float, softcap: float | None, chunk: int) -> None:
    # Not gradcheck: the stored gradients are released by the first backward, and
    # gradcheck backpropagates through one graph many times. Float64 against the
    # straightforward path's autograd is as strict a check of the formulas.
    hidden, weight, b, labels = leaf(*make(7, 5, 11, torch.float64, seed=7))
    tw = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.0, 0.25, 1.0], dtype=torch.float64)
    out = fused_linear_nll(
        hidden, weight, b, labels, tw, chunk_size=chunk, logit_scale=scale, softcap=softcap
    )
    want = reference_nll(hidden, weight, b, labels, tw, scale, softcap)
    for got, ref in zip(out[:4], want, strict=True):
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    assert out.num_tokens == 7 and out.nll_sum.grad_fn is None
    got = grads_of(out.loss, hidden, weight, b)
    for g, r in zip(got, grads_of(want[0], hidden, weight, b), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_nll_float32_within_1e5(bias: bool) -> None:
    h32, w32, b32, labels = make(300, 64, 8192, torch.float32, bias=bias, seed=8)
    hidden, weight, b = leaf(h32, w32, b32)
    tw = torch.rand(300, generator=torch.Generator().manual_seed(9)) / 300
    out = fused_linear_nll(hidden, weight, b, labels, tw, chunk_size=64)
    got = grads_of(out.loss, hidden, weight, b)
    ref_loss, ref_nll, ref_ent, ref_correct = reference_nll(hidden, weight, b, labels, tw)
    want = grads_of(ref_loss, hidden, weight, b)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nll_sum, ref_nll.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy_sum, ref_ent.detach(), rtol=1e-5, atol=1e-5)
    assert int(out.num_correct) == int(ref_correct)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_fused_nll_counts_correct_predictions() -> None:
    hidden, weight, _, _ = make(50, 16, 40, torch.float32, bias=False, seed=10)
    labels = (hidden @ weight.t()).argmax(-1)
    labels[:20] = (labels[:20] + 1) % 40
    out = fused_linear_nll(hidden, weight, None, labels, torch.ones(50), chunk_size=7)
    assert int(out.num_correct) == 30


@pytest.mark.parametrize("mode", ["bf16-params", "bf16-matmul"])
def test_fused_nll_bfloat16_within_2e2_relative(mode: str) -> None:
    dtype = torch.bfloat16 if mode == "bf16-params" else torch.float32
    h0, w0, b0, labels = make(256, 64, 4096, dtype, seed=11)
    hidden, weight, b = leaf(h0, w0, b0)
    tw = torch.full((256,), 1 / 256)
    out = fused_linear_nll(
        hidden, weight, b, labels, tw, chunk_size=96, matmul_dtype=torch.bfloat16
    )
    assert out.loss.dtype == torch.float32
    got = grads_of(out.loss, hidden, weight, b)
    assert all(g.dtype == dtype for g in got)
    ref = leaf(h0.double(), w0.double(), b0.double())
    ref_loss, *_ = reference_nll(*ref, labels, tw.double())
    want = grads_of(ref_loss, *ref)
    assert relative_error(out.loss, ref_loss) < 2e-2
    for g, r in zip(got, want, strict=True):
        assert relative_error(g, r) < 2e-2


def test_fused_nll_scales_by_incoming_gradient_once() -> None:
    hidden, weight, b, labels = leaf(*make(9, 4, 13, torch.float32, seed=12))
    tw = torch.ones(9)
    out = fused_linear_nll(hidden, weight, b, labels, tw, chunk_size=4)
    (2.5 * out.loss).backward(retain_graph=True)
    ref = leaf(hidden, weight, b)
    want = grads_of(2.5 * reference_nll(*ref, labels, tw)[0], *ref)
    for g, r in zip((hidden.grad, weight.grad, b.grad), want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


def test_fused_nll_no_grad_and_frozen_weight() -> None:
    hidden, weight, _, labels = make(9, 4, 13, torch.float32, bias=False, seed=13)
    with torch.no_grad():
        out = fused_linear_nll(hidden.requires_grad_(), weight, None, labels, torch.ones(9))
    assert out.loss.grad_fn is None
    out = fused_linear_nll(hidden, weight, None, labels, torch.ones(9))
    (g,) = torch.autograd.grad(out.loss, [hidden])
    ref = leaf(hidden)[0]
    (r,) = torch.autograd.grad(reference_nll(ref, weight, None, labels, torch.ones(9))[0], [ref])
    torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_fused_nll_rejects_bad_input() -> None:
    hidden, weight, _, labels = make(5, 4, 10, torch.float32, bias=False)
    bad = labels.clone()
    bad[2] = -100
    with pytest.raises(ValueError, match="-100"):
        fused_linear_nll(hidden, weight, None, bad, torch.ones(5))
    with pytest.raises(ValueError, match="token_weights"):
        fused_linear_nll(hidden, weight, None, labels, torch.ones(4))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_nll(hidden, weight, None, labels, torch.ones(5), chunk_size=0)


@pytest.mark.parametrize(
    ("matmul_dtype", "softcap"),
    [(None, None), (torch.bfloat16, None), (None, 2.0), (torch.bfloat16, 2.0)],
)
def test_fused_nll_workspace_reuse_matches_fresh_buffers(
    matmul_dtype: torch.dtype | None, softcap: float | None
) -> None:
    # One workspace across calls of different sizes, and across an in-place weight
    # update between them (as an optimizer step makes): every result equals the call
    # with fresh buffers, bit for bit, and no returned gradient aliases the workspace.
    ws = Workspace()
    _, weight, b, _ = make(1, 16, 97, torch.float32, seed=14)
    kept = []
    for step, n in enumerate((23, 7, 40, 40)):
        hidden, _, _, labels = make(n, 16, 97, torch.float32, seed=15 + step)
        tw = torch.rand(n, generator=torch.Generator().manual_seed(step))
        results = []
        for workspace in (None, ws):
            h, w, bias = leaf(hidden, weight, b)
            out = fused_linear_nll(
                h,
                w,
                bias,
                labels,
                tw,
                chunk_size=16,
                matmul_dtype=matmul_dtype,
                softcap=softcap,
                workspace=workspace,
            )
            results.append((out[:4], grads_of(out.loss, h, w, bias)))
        (fresh, fresh_grads), (reused, reused_grads) = results
        for got, want in zip((*reused, *reused_grads), (*fresh, *fresh_grads), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        kept.append([g.clone() for g in reused_grads] + list(reused_grads))
        with torch.no_grad():
            weight.add_(0.1 * torch.randn_like(weight))
    for grads in kept:  # later calls did not write into earlier gradients
        half = len(grads) // 2
        for before, returned in zip(grads[:half], grads[half:], strict=True):
            torch.testing.assert_close(returned, before, rtol=0, atol=0)
