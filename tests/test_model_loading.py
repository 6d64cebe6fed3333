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


def test_model_directory_without_weights_is_one_line(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Config and tokenizer copied without the weights: transformers' own error was a
    31-line OSError traceback from generate, eval and sft alike."""
    from posttrain.cli.main import main

    bare = tmp_path / "no-weights"
    bare.mkdir()
    for path in (workdir / "model").iterdir():
        if "safetensors" not in path.name:
            shutil.copy(path, bare / path.name)
    with pytest.raises(ValueError, match=r"no-weights has no model weights \(model\.safetensors"):
        model_chain(bare)
    # An adapter whose base lost its weights says which directory lacks them.
    with pytest.raises(ValueError, match="no-weights has no model weights"):
        model_chain(adapter(tmp_path / "lora", bare))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b", "answer": "b"}\n', encoding="utf-8")
    commands = {
        "generate": ["--prompt", "hi"],
        "eval": ["--data", str(data), "--reward", "exact", "--output-dir", str(tmp_path / "e")],
        "sft": ["--train-file", str(data), "--output-dir", str(tmp_path / "s")],
    }
    for command, argv in commands.items():
        assert main([command, "--model", str(bare), *argv]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"posttrain {command}: error: {bare} has no model weights"), err
        assert err.count("\n") == 1 and "config.json, generation_config.json" in err, err
