"""The chunked linear-head log-prob kernel against the straightforward full-logits path."""

from __future__ import annotations

import pytest
import torch
from helpers import grads_of, leaf, make, reference, relative_error
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.models.tiny import QWEN25_VOCAB_SIZE
from posttrain.ops.linear_log_probs import chunked_log_probs
from posttrain.ops.projection import default_chunk_size

# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("bias", "scale", "softcap", "chunk"),
    [(True, 1.0, None, 3), (False, 1.0, None, 1), (True, 0.7, None, 4), (False, 1.3, 2.0, 3)],
)
@pytest.mark.parametrize("entropy", [True, False])
def test_gradcheck_float64(
    bias: bool, scale: float, softcap: float | None, chunk: int, entropy: bool
) -> None:
    hidden, weight, b, labels = leaf(*make(7, 5, 11, torch.float64, bias=bias))

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lp, ent = chunked_log_probs(
            args[0],
            args[1],
            args[2] if bias else None,
            labels,
            return_entropy=entropy,
            chunk_size=chunk,
            logit_scale=scale,
            softcap=softcap,
        )
        return (lp, ent) if entropy else (lp,)

    inputs = (hidden, weight, b) if bias else (hidden, weight)
    lp, ent = chunked_log_probs(
        hidden, weight, b, labels, return_entropy=True, logit_scale=scale, softcap=softcap
    )
    ref_lp, ref_ent = reference(hidden, weight, b, labels, scale, softcap)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_frozen_weight_and_skipped_rows() -> None:
    hidden, weight, _, labels = make(9, 4, 13, torch.float64, bias=False)
    hidden.requires_grad_()
    mask = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.float64)

    def fn(h: torch.Tensor) -> torch.Tensor:
        lp, ent = chunked_log_probs(h, weight, None, labels, return_entropy=True, chunk_size=2)
        return (lp * mask).sum() + 0.01 * (ent * mask).sum()

    assert torch.autograd.gradcheck(fn, (hidden,))


@pytest.mark.parametrize(
    ("lp_rows", "ent_rows"),
    [("half", "half"), ("half", "none"), ("none", "some"), ("some", "other"), ("none", "none")],
)
def test_skipped_rows_give_exactgrads_of(lp_rows: str, ent_rows: str) -> None:
    n = 23
    picks = {
        "half": torch.arange(n) % 2 == 0,
        "some": torch.arange(n) % 5 == 1,
        "other": torch.arange(n) % 3 == 0,
        "none": torch.zeros(n, dtype=torch.bool),
    }
    w_lp, w_ent = picks[lp_rows].double() * 1.5, picks[ent_rows].double() * -0.3
    hidden, weight, b, labels = leaf(*make(n, 6, 29, torch.float64))
    lp, ent = chunked_log_probs(hidden, weight, b, labels, return_entropy=True, chunk_size=4)
    got = grads_of((lp * w_lp).sum() + (ent * w_ent).sum() + 0 * lp.sum(), hidden, weight, b)
    ref_lp, ref_ent = reference(hidden, weight, b, labels)
    want = grads_of((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum(), hidden, weight, b)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_float32_matches_full_logits_within_1e5(bias: bool) -> None:
    # Model-sized in the vocabulary direction: 2 x 150 tokens, 8,192 entries, hidden 64.
    h32, w32, b32, labels = make(300, 64, 8192, torch.float32, bias=bias, seed=1)
    labels = labels.reshape(2, 150)
    hidden, weight, b = leaf(h32.reshape(2, 150, 64), w32, b32)
    mask = (torch.rand(2, 150, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    lp, ent = chunked_log_probs(hidden, weight, b, labels, return_entropy=True, chunk_size=64)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    got = grads_of((lp * mask).sum() + 0.01 * (ent * mask).sum(), hidden, weight, b)
    ref_lp, ref_ent = reference(hidden, weight, b, labels)
    want = grads_of((ref_lp * mask).sum() + 0.01 * (ref_ent * mask).sum(), hidden, weight, b)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_where_the_label_probability_underflows(dtype: torch.dtype) -> None:
    # Logits spread over hundreds of nats: exp() of some label logits underflows to 0.
    hidden, weight, b, labels = make(12, 4, 50, dtype, seed=5)
    hidden, weight, b = leaf(hidden * 150, weight, b)
    ref_lp, ref_ent = reference(*(t.double() for t in (hidden, weight, b)), labels)
    assert (ref_lp < -120).any() and (ref_lp > -1).any()
    lp, ent = chunked_log_probs(hidden, weight, b, labels, return_entropy=True, chunk_size=5)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-4)
    grads = grads_of(lp.sum() + ent.sum(), hidden, weight, b)
    assert all(torch.isfinite(g).all() for g in grads)


def test_bfloat16_within_2e2_relative() -> None:
    hb, wb, bb, labels = make(256, 64, 4096, torch.bfloat16, seed=3)
    hidden, weight, b = leaf(hb, wb, bb)
    mask = (torch.arange(256) % 3 != 0).float()
    lp, ent = chunked_log_probs(hidden, weight, b, labels, return_entropy=True, chunk_size=96)
    assert lp.dtype == torch.float32
    got = grads_of((lp * mask).sum() + 0.01 * (ent * mask).sum(), hidden, weight, b)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.bfloat16
    # The reference is exact arithmetic on the same bfloat16 numbers.
    ref = leaf(hb.double(), wb.double(), bb.double())
    ref_lp, ref_ent = reference(*ref, labels)
    want = grads_of((ref_lp * mask).sum() + 0.01 * (ref_ent * mask).sum(), *ref)
    assert relative_error(lp, ref_lp) < 2e-2
    assert relative_error(ent, ref_ent) < 2e-2
    for g, r in zip(got, want, strict=True):
        assert relative_error(g, r) < 2e-2


def test_saves_no_vocabulary_sized_tensor() -> None:
    hidden, weight, b, labels = leaf(*make(40, 8, 1000, torch.float32))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_log_probs(hidden, weight, b, labels, return_entropy=True, chunk_size=8)
    # Only the inputs (the weight being the largest) and per-token statistics.
    assert saved and max(saved) <= weight.numel() < 40 * 1000
    assert sum(1 for s in saved if s == 40) == 3  # labels, log-sum-exp, entropy


class _ChunkAllocations(TorchDispatchMode):
    """Counts the tensors of exactly `shape` that aten allocates while active."""

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        allocators = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default)
        if func in allocators and tuple(out.shape) == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize(("entropy_weight", "buffers"), [(0.0, 1), (0.01, 2)])
def test_backward_holds_a_second_chunk_buffer_only_for_an_entropy_gradient(
    entropy_weight: float, buffers: int
) -> None:
    """Log-probs alone (DPO, a policy gradient without entropy bonus) need one
    vocabulary-sized chunk buffer in backward; an entropy gradient needs p and log p."""
    hidden, weight, b, labels = leaf(*make(40, 8, 1000, torch.float32))
    lp, ent = chunked_log_probs(hidden, weight, b, labels, return_entropy=True, chunk_size=8)
    loss = lp.sum() + (entropy_weight * ent.sum() if entropy_weight else 0 * lp.sum())
    counter = _ChunkAllocations((8, 1000))
    with counter:
        loss.backward()
    assert counter.count == buffers


# --------------------------------------------------------------------------- arguments


def test_labels_out_of_range_raise() -> None:
    hidden, weight, _, labels = make(5, 4, 10, torch.float32)
    for bad in (-100, 10):
        wrong = labels.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match=str(bad)):
            chunked_log_probs(hidden, weight, None, wrong)
    with pytest.raises(ValueError, match="integer"):
        chunked_log_probs(hidden, weight, None, labels.float())


def test_shape_and_chunk_errors() -> None:
    hidden, weight, _, labels = make(5, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        chunked_log_probs(hidden, weight, None, labels[:4])
    with pytest.raises(ValueError, match="weight"):
        chunked_log_probs(hidden, weight[:, :3], None, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_log_probs(hidden, weight, None, labels, chunk_size=0)


def test_empty_input() -> None:
    hidden, weight, _, _ = leaf(*make(1, 4, 10, torch.float32, bias=False))
    lp, ent = chunked_log_probs(
        hidden[:0], weight, None, torch.zeros(0, dtype=torch.long), return_entropy=True
    )
    assert lp.shape == ent.shape == (0,)
    lp.sum().backward()


def test_default_chunk_size() -> None:
    assert default_chunk_size(QWEN25_VOCAB_SIZE, 896, torch.float32) == 256
    assert default_chunk_size(QWEN25_VOCAB_SIZE, 896, torch.bfloat16) <= 256
    assert default_chunk_size(QWEN25_VOCAB_SIZE, 896, budget_bytes=1) == 1
    assert default_chunk_size(512, 64) % 32 == 0
    small = default_chunk_size(QWEN25_VOCAB_SIZE, 896, budget_bytes=64 * 2**20)
    assert 32 <= small < 256
    with pytest.raises(ValueError):
        default_chunk_size(0, 64)
