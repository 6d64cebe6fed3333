"""Model-head discovery: every allow-listed family against its own logits, the fallbacks,
and `get_response_log_probs` on the lean path."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from posttrain import primitives
from posttrain.models import heads as model_heads
from posttrain.models.heads import find_linear_head
from posttrain.primitives import lean_response_log_probs

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
    assert classes == set(model_heads.HEAD_FAMILIES)


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
    real = primitives.lean_response_log_probs

    def spy(*args: object, **kwargs: object):
        calls.append(kwargs.get("chunk_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(primitives, "lean_response_log_probs", spy)
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


def test_body_without_padding_takes_the_causal_attention_kernel(
    tiny_qwen2: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A micro-batch without padding must reach SDPA with no mask and is_causal=True (its
    # fast kernel); only a padded one carries a mask.
    import torch.nn.functional as F

    seen: list[tuple[bool, bool]] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, bool(kwargs.get("is_causal"))))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, tiny_qwen2.config.vocab_size, (2, 9))
    model_heads.body_hidden_states(tiny_qwen2, ids, torch.ones_like(ids))
    layers = tiny_qwen2.config.num_hidden_layers
    assert seen == [(True, True)] * layers
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    seen.clear()
    model_heads.body_hidden_states(tiny_qwen2, ids, padded)
    assert seen == [(False, False)] * layers
