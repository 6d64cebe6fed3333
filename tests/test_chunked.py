"""The chunked log-prob path against the straightforward full-logits log_softmax path."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from posttrain import chunked
from posttrain.chunked import (
    chunked_log_probs,
    default_chunk_size,
    find_linear_head,
    lean_response_log_probs,
)
from posttrain.offline import QWEN25_VOCAB_SIZE


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: with two threads on a shared 2-core machine, each softmax or max
    waits milliseconds on an OpenMP barrier, which dominates these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """softcap(scale * (hidden @ weight.T + bias)), written out."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits, log_softmax, gather; entropy = -sum p log p."""
    logp = torch.log_softmax(reference_logits(hidden, weight, bias, scale, softcap), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def make(n: int, h: int, v: int, dtype: torch.dtype, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(dtype)
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, b, labels


def leaf(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Fresh leaves that require grad (integer tensors pass through)."""
    return [
        t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t
        for t in tensors
    ]


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


def _grads(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    wanted = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [None if t is None else next(got) for t in tensors]


@pytest.mark.parametrize(
    ("lp_rows", "ent_rows"),
    [("half", "half"), ("half", "none"), ("none", "some"), ("some", "other"), ("none", "none")],
)
def test_skipped_rows_give_exact_grads(lp_rows: str, ent_rows: str) -> None:
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
    got = _grads((lp * w_lp).sum() + (ent * w_ent).sum() + 0 * lp.sum(), hidden, weight, b)
    ref_lp, ref_ent = reference(hidden, weight, b, labels)
    want = _grads((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum(), hidden, weight, b)
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
    got = _grads((lp * mask).sum() + 0.01 * (ent * mask).sum(), hidden, weight, b)
    ref_lp, ref_ent = reference(hidden, weight, b, labels)
    want = _grads((ref_lp * mask).sum() + 0.01 * (ref_ent * mask).sum(), hidden, weight, b)
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
    grads = _grads(lp.sum() + ent.sum(), hidden, weight, b)
    assert all(torch.isfinite(g).all() for g in grads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_bfloat16_within_2e2_relative() -> None:
    hb, wb, bb, labels = make(256, 64, 4096, torch.bfloat16, seed=3)
    hidden, weight, b = leaf(hb, wb, bb)
    mask = (torch.arange(256) % 3 != 0).float()
    lp, ent = chunked_log_probs(hidden, weight, b, labels, return_entropy=True, chunk_size=96)
    assert lp.dtype == torch.float32
    got = _grads((lp * mask).sum() + 0.01 * (ent * mask).sum(), hidden, weight, b)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.bfloat16
    # The reference is exact arithmetic on the same bfloat16 numbers.
    ref = leaf(hb.double(), wb.double(), bb.double())
    ref_lp, ref_ent = reference(*ref, labels)
    want = _grads((ref_lp * mask).sum() + 0.01 * (ref_ent * mask).sum(), *ref)
    assert _rel(lp, ref_lp) < 2e-2
    assert _rel(ent, ref_ent) < 2e-2
    for g, r in zip(got, want, strict=True):
        assert _rel(g, r) < 2e-2


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


# --------------------------------------------------------------------------- models


def full_logits_log_probs(model: PreTrainedModel, ids, labels, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def compare_to_full_logits(model: PreTrainedModel, chunk_size: int | None = 5) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 9), generator=gen)
    labels = torch.randint(0, vocab, (2, 9), generator=gen)
    attn = torch.ones(2, 9, dtype=torch.long)
    attn[1, 6:] = 0
    weights = attn.float() * (torch.arange(9) >= 3).float()
    params = [p for p in model.parameters() if p.requires_grad]

    out = lean_response_log_probs(
        model,
        ids,
        labels,
        attention_mask=attn,
        return_token_entropy=True,
        chunk_size=chunk_size,
    )
    assert out is not None
    got = torch.autograd.grad(
        (out["log_probs"] * weights).sum() + 0.01 * (out["token_entropy"] * weights).sum(),
        params,
        allow_unused=True,
    )
    ref_lp, ref_ent = full_logits_log_probs(model, ids, labels, attn)
    want = torch.autograd.grad(
        (ref_lp * weights).sum() + 0.01 * (ref_ent * weights).sum(), params, allow_unused=True
    )
    torch.testing.assert_close(out["log_probs"], ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["token_entropy"], ref_ent, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want, strict=True):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_untied_llama(tiny_llama: PreTrainedModel) -> None:
    head = find_linear_head(tiny_llama)
    assert head is not None and head.weight is tiny_llama.lm_head.weight
    assert head.weight is not tiny_llama.get_input_embeddings().weight
    compare_to_full_logits(tiny_llama)


def test_tied_qwen2(tiny_qwen2: PreTrainedModel) -> None:
    head = find_linear_head(tiny_qwen2)
    assert head is not None and head.weight is tiny_qwen2.get_input_embeddings().weight
    compare_to_full_logits(tiny_qwen2, chunk_size=None)


def test_returns_only_log_probs_without_entropy(tiny_llama: PreTrainedModel) -> None:
    ids = torch.randint(0, 300, (1, 4))
    out = lean_response_log_probs(tiny_llama, ids, ids)
    assert out is not None and set(out) == {"log_probs"} and out["log_probs"].shape == (1, 4)
    with pytest.raises(ValueError, match="-100"):
        lean_response_log_probs(tiny_llama, ids, torch.full_like(ids, -100))


# Tiny configs of every allow-listed family, with the head transforms made non-trivial.
FAMILIES: dict[str, dict[str, object]] = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {},
    "qwen2_moe": {},
    "qwen3_moe": {},
    "mistral": {},
    "mixtral": {},
    "gemma": {},
    "gemma2": {"final_logit_softcapping": 0.5},
    "gemma3_text": {"final_logit_softcapping": 0.7},
    "phi": {},  # lm_head has a bias
    "phi3": {},
    "starcoder2": {},
    "olmo": {},
    "olmo2": {},
    "gpt_neox": {},
    "smollm3": {},
    "cohere": {"logit_scale": 3.0},
    "granite": {"logits_scaling": 0.25},
}


def tiny_family_model(model_type: str, **overrides: object) -> PreTrainedModel:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=96,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_allow_list_is_covered() -> None:
    classes = {type(tiny_family_model(t, **o)).__name__ for t, o in FAMILIES.items()}
    assert classes == set(chunked._HEAD_FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_allowed_family_matches_its_own_logits(model_type: str) -> None:
    model = tiny_family_model(model_type, **FAMILIES[model_type])
    head = find_linear_head(model)
    assert head is not None
    if model_type == "phi":
        assert head.bias is not None
    if model_type.startswith("gemma") and model_type != "gemma":
        assert head.softcap is not None
    compare_to_full_logits(model)


# --------------------------------------------------------------------------- fallbacks


class CustomLlama(LlamaForCausalLM):
    """A user subclass: its forward may do anything, so the lean path must not assume."""


class ScaledHead(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_unknown_architecture_falls_back_and_logs_once(
    tiny_llama: PreTrainedModel, caplog: pytest.LogCaptureFixture
) -> None:
    custom = CustomLlama(tiny_llama.config)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        assert lean_response_log_probs(custom, ids, ids) is None
        assert lean_response_log_probs(custom, ids, ids) is None
    lines = [r for r in caplog.records if "CustomLlama" in r.getMessage()]
    assert len(lines) == 1 and "full-logits" in lines[0].getMessage()


def test_non_linear_head_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_family_model("llama")
    model.lm_head = ScaledHead(16, 96, bias=False)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        assert find_linear_head(model) is None
    assert any("ScaledHead" in r.getMessage() for r in caplog.records)


def test_gemma2_without_softcap_is_plain() -> None:
    model = tiny_family_model("gemma2", final_logit_softcapping=None)
    head = find_linear_head(model)
    assert head is not None and head.softcap is None and head.logit_scale == 1.0


# --------------------------------------------------------------------------- integration


def test_get_response_log_probs_defaults_to_the_lean_path(
    tiny_qwen2: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from posttrain.primitives import get_response_log_probs

    calls: list[int | None] = []
    real = chunked.lean_response_log_probs

    def spy(*args: object, **kwargs: object):
        calls.append(kwargs.get("chunk_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked, "lean_response_log_probs", spy)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(4))
    labels = ids.roll(-1, dims=1)
    params = list(tiny_qwen2.parameters())
    lean = get_response_log_probs(tiny_qwen2, ids, labels, True, chunk_size=5)
    assert calls == [5]
    full = get_response_log_probs(tiny_qwen2, ids, labels, True, lean=False)
    assert calls == [5]
    for key in ("log_probs", "token_entropy"):
        torch.testing.assert_close(lean[key], full[key], rtol=1e-5, atol=1e-5)
    loss = [(out["log_probs"] + 0.1 * out["token_entropy"]).sum() for out in (lean, full)]
    for g, r in zip(*(torch.autograd.grad(x, params) for x in loss), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_get_response_log_probs_falls_back_for_unknown_models(
    tiny_llama: PreTrainedModel,
) -> None:
    from posttrain.primitives import get_response_log_probs

    custom = CustomLlama(tiny_llama.config)
    custom.load_state_dict(tiny_llama.state_dict())
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(6))
    got = get_response_log_probs(custom, ids, ids, True)
    want = get_response_log_probs(tiny_llama, ids, ids, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
    out = chunked.fused_linear_nll(
        hidden, weight, b, labels, tw, chunk_size=chunk, logit_scale=scale, softcap=softcap
    )
    want = reference_nll(hidden, weight, b, labels, tw, scale, softcap)
    for got, ref in zip(out[:4], want, strict=True):
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    assert out.num_tokens == 7 and out.nll_sum.grad_fn is None
    got = _grads(out.loss, hidden, weight, b)
    for g, r in zip(got, _grads(want[0], hidden, weight, b), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_nll_float32_within_1e5(bias: bool) -> None:
    h32, w32, b32, labels = make(300, 64, 8192, torch.float32, bias=bias, seed=8)
    hidden, weight, b = leaf(h32, w32, b32)
    tw = torch.rand(300, generator=torch.Generator().manual_seed(9)) / 300
    out = chunked.fused_linear_nll(hidden, weight, b, labels, tw, chunk_size=64)
    got = _grads(out.loss, hidden, weight, b)
    ref_loss, ref_nll, ref_ent, ref_correct = reference_nll(hidden, weight, b, labels, tw)
    want = _grads(ref_loss, hidden, weight, b)
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
    out = chunked.fused_linear_nll(hidden, weight, None, labels, torch.ones(50), chunk_size=7)
    assert int(out.num_correct) == 30


@pytest.mark.parametrize("mode", ["bf16-params", "bf16-matmul"])
def test_fused_nll_bfloat16_within_2e2_relative(mode: str) -> None:
    dtype = torch.bfloat16 if mode == "bf16-params" else torch.float32
    h0, w0, b0, labels = make(256, 64, 4096, dtype, seed=11)
    hidden, weight, b = leaf(h0, w0, b0)
    tw = torch.full((256,), 1 / 256)
    out = chunked.fused_linear_nll(
        hidden, weight, b, labels, tw, chunk_size=96, matmul_dtype=torch.bfloat16
    )
    assert out.loss.dtype == torch.float32
    got = _grads(out.loss, hidden, weight, b)
    assert all(g.dtype == dtype for g in got)
    ref = leaf(h0.double(), w0.double(), b0.double())
    ref_loss, *_ = reference_nll(*ref, labels, tw.double())
    want = _grads(ref_loss, *ref)
    assert _rel(out.loss, ref_loss) < 2e-2
    for g, r in zip(got, want, strict=True):
        assert _rel(g, r) < 2e-2


def test_fused_nll_scales_by_incoming_gradient_once() -> None:
    hidden, weight, b, labels = leaf(*make(9, 4, 13, torch.float32, seed=12))
    tw = torch.ones(9)
    out = chunked.fused_linear_nll(hidden, weight, b, labels, tw, chunk_size=4)
    (2.5 * out.loss).backward(retain_graph=True)
    ref = leaf(hidden, weight, b)
    want = _grads(2.5 * reference_nll(*ref, labels, tw)[0], *ref)
    for g, r in zip((hidden.grad, weight.grad, b.grad), want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


def test_fused_nll_no_grad_and_frozen_weight() -> None:
    hidden, weight, _, labels = make(9, 4, 13, torch.float32, bias=False, seed=13)
    with torch.no_grad():
        out = chunked.fused_linear_nll(hidden.requires_grad_(), weight, None, labels, torch.ones(9))
    assert out.loss.grad_fn is None
    out = chunked.fused_linear_nll(hidden, weight, None, labels, torch.ones(9))
    (g,) = torch.autograd.grad(out.loss, [hidden])
    ref = leaf(hidden)[0]
    (r,) = torch.autograd.grad(reference_nll(ref, weight, None, labels, torch.ones(9))[0], [ref])
    torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_fused_nll_rejects_bad_input() -> None:
    hidden, weight, _, labels = make(5, 4, 10, torch.float32, bias=False)
    bad = labels.clone()
    bad[2] = -100
    with pytest.raises(ValueError, match="-100"):
        chunked.fused_linear_nll(hidden, weight, None, bad, torch.ones(5))
    with pytest.raises(ValueError, match="token_weights"):
        chunked.fused_linear_nll(hidden, weight, None, labels, torch.ones(4))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked.fused_linear_nll(hidden, weight, None, labels, torch.ones(5), chunk_size=0)
