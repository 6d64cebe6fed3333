"""Checkpoints: HF-loadable, atomic under crashes, pruned, and exact on resume."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from posttrain.config import SFTConfig, config_from_dict
from posttrain.engine import checkpoints as ckpt
from posttrain.engine.rng_state import restore_rng_state
from posttrain.models.tiny import tiny_causal_lm

CFG = SFTConfig(model="models/tiny", train_file="train.jsonl", keep_last=2, max_steps=4)


def _optim(
    model: torch.nn.Module,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return optimizer, scheduler


def _train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object
) -> None:
    """One step whose data and dropout draw from every RNG a checkpoint restores."""
    vocab = model.config.vocab_size
    length = 6 + random.randrange(3) + int(np.random.randint(0, 2))
    ids = torch.randint(0, vocab, (2, length))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_checkpoint_loads_with_auto_classes(
    tmp_path: Path, tiny_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    path = ckpt.save_checkpoint(tmp_path, 10, tiny_llama, llama_tokenizer, None, None, CFG)
    assert path == tmp_path / "checkpoints" / "step-000010"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        assert (path / name).is_file(), name
    assert ckpt.is_complete(path) and ckpt.latest_checkpoint(tmp_path) == path

    model = AutoModelForCausalLM.from_pretrained(path)
    for key, value in tiny_llama.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "Hello, world! naïve café"
    assert tokenizer(text)["input_ids"] == llama_tokenizer(text)["input_ids"]
    assert config_from_dict(ckpt.load_checkpoint_config(path)) == CFG
    state = ckpt.load_trainer_state(path)
    assert state["step"] == 10 and state["optimizer"] is None and state["extra"] == {}


def test_crash_mid_save_leaves_no_loadable_checkpoint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_llama: PreTrainedModel,
    llama_tokenizer: PreTrainedTokenizerFast,
) -> None:
    good = ckpt.save_checkpoint(tmp_path, 1, tiny_llama, llama_tokenizer, None, None, CFG)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    # Everything but the marker has been written when this fires.
    monkeypatch.setattr(ckpt, "_write_marker", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, tiny_llama, llama_tokenizer, None, None, CFG)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]

    # A hard kill (no cleanup) leaves a temp dir of another process, and a step dir
    # that never got its marker; neither counts, and the next save sweeps the temp dir.
    stale = tmp_path / "checkpoints" / "step-000003.tmp-999999"
    shutil.copytree(good, stale)
    (stale / ckpt.COMPLETE_MARKER).unlink()
    unmarked = tmp_path / "checkpoints" / "step-000004"
    shutil.copytree(stale, unmarked)
    assert ckpt.latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_trainer_state(unmarked)
    ckpt.save_checkpoint(tmp_path, 2, tiny_llama, llama_tokenizer, None, None, CFG)
    assert not stale.exists()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000002"


def test_interrupt_during_model_write_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: PreTrainedModel
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_llama), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 5, tiny_llama, None, None, None, None)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_keep_last_prunes_older_checkpoints(
    tmp_path: Path, tiny_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(tmp_path, step, tiny_llama, llama_tokenizer, None, None, CFG)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000015", "step-000020"]  # CFG.keep_last == 2
    ckpt.save_checkpoint(tmp_path, 25, tiny_llama, None, None, None, CFG, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000025"]
    # Saving a step again replaces it in place.
    ckpt.save_checkpoint(tmp_path, 25, tiny_llama, None, None, None, CFG, extra={"v": 2})
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path))["extra"] == {"v": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000025"]


def test_rng_restore_replays_the_same_numbers(tmp_path: Path, tiny_llama: PreTrainedModel) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_llama, None, None, None, None)

    def draw() -> tuple[float, list[float], list[float]]:
        return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    expected = draw()
    draw()  # move every generator on
    restore_rng_state(ckpt.load_trainer_state(path))
    assert draw() == expected


def test_unsafe_extra_is_rejected_at_save_time(tmp_path: Path, tiny_llama: PreTrainedModel) -> None:
    with pytest.raises(TypeError, match=r"trainer_state\['extra'\]\['pos'\] has type float64"):
        ckpt.save_checkpoint(
            tmp_path, 1, tiny_llama, None, None, None, None, extra={"pos": np.float64(1.0)}
        )
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_resume_reproduces_an_uninterrupted_run(
    tmp_path: Path, tiny_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    # Dropout makes the forward pass itself consume torch RNG.
    base = tiny_causal_lm(
        "llama",
        vocab_size=len(llama_tokenizer),
        hidden_size=16,
        num_layers=1,
        seed=7,
        attention_dropout=0.2,
    )

    def seed_all() -> None:
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)

    # Uninterrupted: 4 steps.
    seed_all()
    straight = copy.deepcopy(base)
    optimizer, scheduler = _optim(straight)
    for _ in range(4):
        _train_step(straight, optimizer, scheduler)

    # Interrupted after 2 steps, then resumed into fresh objects.
    seed_all()
    first = copy.deepcopy(base)
    optimizer, scheduler = _optim(first)
    for _ in range(2):
        _train_step(first, optimizer, scheduler)
    ckpt.save_checkpoint(
        tmp_path, 2, first, llama_tokenizer, optimizer, scheduler, CFG, extra={"position": 4}
    )
    del first, optimizer, scheduler
    seed_all()  # a new process starts from other RNG states; resume must override them
    torch.rand(5)

    path = ckpt.latest_checkpoint(tmp_path)
    resumed = tiny_causal_lm(
        "llama",
        vocab_size=len(llama_tokenizer),
        hidden_size=16,
        num_layers=1,
        seed=99,
        attention_dropout=0.2,
    )
    ckpt.load_model_weights(resumed, path)
    optimizer, scheduler = _optim(resumed)
    state = ckpt.load_trainer_state(path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state)
    assert state["step"] == 2 and state["extra"] == {"position": 4}
    assert scheduler.last_epoch == 2
    for _ in range(2):
        _train_step(resumed, optimizer, scheduler)

    want, got = _params(straight), _params(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_tied_weights_load_and_stay_tied(tmp_path: Path, tiny_qwen2: PreTrainedModel) -> None:
    assert tiny_qwen2.config.tie_word_embeddings
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_qwen2, None, None, None, None)
    other = tiny_causal_lm(
        "qwen2",
        vocab_size=tiny_qwen2.config.vocab_size,
        hidden_size=32,
        tie_word_embeddings=True,
        seed=123,
    )
    ckpt.load_model_weights(other, path)
    for key, value in tiny_qwen2.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()


def test_mismatched_weights_are_rejected(
    tmp_path: Path, tiny_llama: PreTrainedModel, tiny_qwen2: PreTrainedModel
) -> None:
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_qwen2, None, None, None, None)
    with pytest.raises(ValueError, match="do not match the model"):
        ckpt.load_model_weights(copy.deepcopy(tiny_llama), path)


def test_final_model_is_written_atomically(
    tmp_path: Path, tiny_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    (tmp_path / "final.tmp-999999").mkdir(parents=True)  # from a killed earlier run
    final = ckpt.save_final_model(tmp_path, tiny_llama, llama_tokenizer, CFG)
    assert final == tmp_path / "final" and ckpt.is_complete(final)
    assert not (tmp_path / "final.tmp-999999").exists()
    assert (final / "config.yaml").is_file() and (final / "tokenizer.json").is_file()
    ckpt.save_final_model(tmp_path, tiny_llama, None, None)  # overwrite in place
    assert not (final / "tokenizer.json").exists()
    reloaded = copy.deepcopy(tiny_llama)
    ckpt.load_model_weights(reloaded, final)


def test_model_dir_without_tokenizer_files_is_named(
    tmp_path: Path,
    tiny_llama: PreTrainedModel,
    tiny_qwen2: PreTrainedModel,
    nobos_tokenizer: PreTrainedTokenizerFast,
) -> None:
    # From a Qwen2 config.json alone transformers builds a tokenizer of one special token
    # (training then died on a 0-element reshape); from a Llama one it fails obscurely.
    for name, model in (("qwen2", tiny_qwen2), ("llama", tiny_llama)):
        model.save_pretrained(tmp_path / name)
        for load in (ckpt.load_pretrained, ckpt.load_tokenizer):
            with pytest.raises(ValueError, match=rf"^{tmp_path / name} has no tokenizer files"):
                load(tmp_path / name)
    # Tokenizer files that name a class but hold no vocabulary.
    nobos_tokenizer.save_pretrained(tmp_path / "qwen2")
    (tmp_path / "qwen2" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer files"):
        ckpt.load_pretrained(tmp_path / "qwen2")
    nobos_tokenizer.save_pretrained(tmp_path / "qwen2")
    model, tokenizer = ckpt.load_pretrained(tmp_path / "qwen2")
    text = "Hello, world!"
    assert tokenizer(text)["input_ids"] == nobos_tokenizer(text)["input_ids"]
    assert model.config.vocab_size == tiny_qwen2.config.vocab_size
