"""Which Hugging Face models the chunked kernels can compute exactly, and their parts.

`find_linear_head` reads a model's output head (weight, bias, logit scale, soft cap)
from an allow-list of architectures; `body_hidden_states` runs the model without its
head. Together they let `posttrain.ops` compute log-probs and the training loss without
ever building the (batch, seq, vocab) logits.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger("posttrain")

# CausalLM classes whose forward is `logits = lm_head(body(...).last_hidden_state)`,
# optionally followed by a transform the chunked path reproduces exactly:
#   "plain"   nothing after the projection
#   "softcap" Gemma 2/3: cap * tanh(logits / cap), cap = config.final_logit_softcapping
#   "scale"   Cohere: logits * config.logit_scale
#   "divide"  Granite: logits / config.logits_scaling
# Each entry is checked against the model's own logits in tests/test_model_heads.py.
HEAD_FAMILIES: dict[str, str] = {
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

# Keys of fallbacks already logged, so each is said once per process rather than per
# micro-batch; it holds log bookkeeping only, never state that changes a result.
_fallback_logged: set[str] = set()


def _log_fallback_once(key: str, message: str) -> None:
    if key not in _fallback_logged:
        _fallback_logged.add(key)
        logger.warning("%s; using the full-logits path for log-probs", message)


@dataclass(frozen=True)
class LinearHead:
    """A model's output head in the form the chunked kernels compute.

    logits = softcap(logit_scale * (hidden @ weight.T + bias)), where
    softcap(x) = cap * tanh(x / cap) when `softcap` is set and the identity otherwise.

    `module` is the head's `nn.Linear`; `weight` (vocab, hidden) and `bias` (vocab,) or
    None are read from it on each access, so a head found once stays right when FSDP
    swaps the module's parameters between sharded and gathered.
    """

    module: nn.Linear
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel`, without importing peft: a PeftModel can only
    exist once something imported it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft `PeftModel` (LoRA layers in place, so its
    body computes the adapted hidden states); any other model unchanged."""
    return model.get_base_model() if is_peft_model(model) else model


def find_linear_head(model: nn.Module) -> LinearHead | None:
    """The model's output head if the chunked path can compute it exactly, else None.

    Supported: the transformers CausalLM classes in an allow-list whose forward is
    `lm_head(hidden)` (tied or untied, with or without bias), Gemma 2/3's final-logit
    soft-capping and Cohere/Granite's logit scale, which are applied inside each
    chunk. Anything else (an unknown architecture, a subclass defined outside
    transformers, a head that is not a plain `nn.Linear` such as a LoRA or quantised
    layer) returns None and logs once why, so the caller uses the full-logits path.
    A peft model is looked through (`base_causal_lm`): with LoRA on the body only, its
    head is still the frozen plain `nn.Linear`.
    """
    model = base_causal_lm(model)
    cls = type(model)
    name = cls.__name__
    kind = HEAD_FAMILIES.get(name)
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
    return LinearHead(module=head, logit_scale=scale, softcap=cap)


def body_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The final hidden states (after the last norm), without computing any logits.

    input_ids: (batch, seq) int64; attention_mask: (batch, seq) or None.
    Returns (batch, seq, hidden) in the body's output dtype. A peft model's body is its
    base model's, adapters included.
    """
    model = base_causal_lm(model)
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is model:
        body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def model_vocab_size(model: nn.Module) -> int:
    """Number of rows of the output projection (the logits' last dimension)."""
    model = base_causal_lm(model)
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)
