"""Resolving model and adapter directories: the chain, its tokenizer, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.models.loading import load_tokenizer_of, model_chain


def adapter(path: Path, base: Path | str) -> Path:
    """An adapter directory as far as resolution goes: its config naming the base."""
    path.mkdir(parents=True)
    config = {"base_model_name_or_path": str(base), "peft_type": "LORA"}
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def test_chain_runs_from_the_base_to_the_named_adapter(workdir: Path, tmp_path: Path) -> None:
    base = workdir / "model"
    first = adapter(tmp_path / "first", base)
    # A run's final/ that holds only adapter/ stands for that adapter.
    second = adapter(tmp_path / "run" / "final" / "adapter", first)
    assert model_chain(base) == [base]
    assert model_chain(second) == [base, first, second]
    assert model_chain(tmp_path / "run" / "final") == [base, first, second]


def test_chain_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        model_chain(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        model_chain(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory on this machine"):
        model_chain(adapter(tmp_path / "orphan", tmp_path / "gone"))
    a = adapter(tmp_path / "a", tmp_path / "b")
    adapter(tmp_path / "b", a)
    with pytest.raises(ValueError, match="a loop"):
        model_chain(a)


def test_tokenizer_comes_from_the_last_adapter_that_has_one(workdir: Path, tmp_path: Path) -> None:
    # The base here has weights but no tokenizer files: an adapter's own tokenizer serves.
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(workdir / "model" / name, base / name)
    plain = adapter(tmp_path / "plain", base)
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer_of(model_chain(plain))
    with_tokenizer = adapter(tmp_path / "with", plain)
    for path in (workdir / "model").glob("tokenizer*"):
        shutil.copy(path, with_tokenizer / path.name)
    on_top = adapter(tmp_path / "top", with_tokenizer)
    tokenizer = load_tokenizer_of(model_chain(on_top))
    assert Path(tokenizer.name_or_path) == with_tokenizer
    assert len(tokenizer) > 10
