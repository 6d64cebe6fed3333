"""Session-wide tiny models and tokenizers, built offline once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import reverse_task, write_jsonl
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain.models.tiny import build_qwen_tokenizer, tiny_causal_lm, train_bpe_tokenizer

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Question: What is 12 + 30? Answer: 42",
    "Reverse the word: posttrain -> niartttsop",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "unicode: héllo wörld, naïve café, 日本語, emoji 🤗🚀",
] * 20


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are tiny: with two threads on a busy 2-core machine each small op
    waits milliseconds on an OpenMP barrier, which would dominate the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama style: adds a BOS, has an EOS and no pad token."""
    return train_bpe_tokenizer(CORPUS, vocab_size=384, add_bos=True, with_pad=False)


@pytest.fixture(scope="session")
def nobos_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen style: no BOS, EOS and a pad token."""
    return train_bpe_tokenizer(CORPUS, vocab_size=384, add_bos=False, with_pad=True)


@pytest.fixture(scope="session")
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen2.5 vocabulary (151,665 tokens), built from qwen.tiktoken."""
    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(llama_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_causal_lm("llama", vocab_size=len(llama_tokenizer), hidden_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(nobos_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Qwen2 with tied embeddings and attention biases, as Qwen2.5's small models have."""
    return tiny_causal_lm(
        "qwen2", vocab_size=len(nobos_tokenizer), hidden_size=32, tie_word_embeddings=True, seed=1
    )


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, llama_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer, and train/eval files."""
    root = tmp_path_factory.mktemp("training")
    model = tiny_causal_lm("llama", vocab_size=len(llama_tokenizer), hidden_size=32, seed=3)
    model.save_pretrained(root / "model")
    llama_tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "train.jsonl", reverse_task(48, seed=0))
    write_jsonl(root / "eval.jsonl", reverse_task(12, seed=1))
    return root
