"""Resuming is safe: a finished run stays finished, nothing older replaces final/, a
checkpoint can be named, and changed settings are reported or refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers import make_config

from posttrain.cli.main import main
from posttrain.config import SFTConfig
from posttrain.engine.checkpoints import checkpoint_dir, final_step
from posttrain.sft.train import train


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.fixture
def finished(workdir: Path, tmp_path: Path) -> tuple[SFTConfig, Path]:
    """A finished 6-step run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    config = make_config(workdir, out, max_steps=6, save_every=2, keep_last=5)
    train(config)
    assert final_step(out) == 6
    return config, out


def resumed(config: SFTConfig, **changes: object) -> SFTConfig:
    return SFTConfig(**{**config.__dict__, "resume": True, **changes})


def test_resuming_a_finished_run_does_nothing(finished, capsys, caplog) -> None:
    config, out = finished
    before = snapshot(out)
    result = train(resumed(config))
    assert result.already_finished and result.steps == 6
    assert snapshot(out) == before
    # The CLI says so instead of "done: ... final loss nan".
    cfg_file = out.parent / "run.yaml"
    cfg_file.write_text(json.dumps({**config.__dict__, "resume": True}), encoding="utf-8")
    assert main(["sft", "--config", str(cfg_file)]) == 0
    said = capsys.readouterr().out
    assert "already finished (6 steps): nothing to do" in said and "nan" not in said
    assert snapshot(out) == before
    # Said once, in one wording (issue 21, 12): not also as a log line.
    assert (said + caplog.text).count("nothing to do") == 1


def test_resuming_a_finished_run_loads_no_weights(workdir: Path, tmp_path: Path) -> None:
    # The answer comes from the tokenizer, the data and the run directory: a model whose
    # weights are gone (or would take minutes to load) is never read.
    model = tmp_path / "model"
    shutil.copytree(workdir / "model", model)
    out = tmp_path / "run"
    config = SFTConfig(**{**make_config(workdir, out, max_steps=2).__dict__, "model": str(model)})
    train(config)
    (model / "model.safetensors").unlink()
    result = train(resumed(config))
    assert result.already_finished and result.steps == 2


@pytest.mark.parametrize("max_steps", [3, 9])
def test_other_step_counts_on_a_finished_run_are_refused(finished, max_steps) -> None:
    config, out = finished
    before = snapshot(out)
    with pytest.raises(ValueError, match="finished at step 6") as info:
        train(resumed(config, max_steps=max_steps))
    assert ("Nothing was changed" in str(info.value)) == (max_steps < 6)
    assert snapshot(out) == before


def test_max_steps_below_the_checkpoint_is_refused(finished) -> None:
    config, out = finished
    cut_final(out)  # killed before the final save: the newest checkpoint is step 4
    before = snapshot(out)
    with pytest.raises(ValueError, match="at step 4, past max_steps 3; nothing was changed"):
        train(resumed(config, max_steps=3))
    assert snapshot(out) == before


def test_resume_from_a_named_checkpoint(finished, tmp_path) -> None:
    config, out = finished
    other = tmp_path / "branch"
    result = train(resumed(config, output_dir=str(other), resume_from=str(checkpoint_dir(out, 2))))
    assert result.steps == 6 and not result.already_finished
    steps = [json.loads(x)["step"] for x in (other / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4, 5, 6]
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint directory"):
        train(resumed(config, output_dir=str(other), resume_from=str(incomplete)))


def test_resume_from_a_rotated_checkpoint_lists_the_ones_that_exist(finished, tmp_path) -> None:
    """keep_last deleted step 2 of this run (issue 21, 12): say it is gone, and what is left."""
    config, out = finished
    gone = checkpoint_dir(out, 1)
    with pytest.raises(ValueError, match="no such checkpoint") as error:
        train(resumed(config, output_dir=str(tmp_path / "other"), resume_from=str(gone)))
    assert str(checkpoint_dir(out, 4)) in str(error.value)


def cut_final(out: Path) -> None:
    """Turn the finished run into one killed after its step-4 checkpoint."""
    import shutil

    shutil.rmtree(out / "final")


def test_breaking_changes_are_refused_unless_insisted(finished, caplog) -> None:
    config, out = finished
    cut_final(out)
    before = snapshot(out)
    with pytest.raises(
        ValueError,
        match=r"changed seed, the global batch \(8 -> 4 examples per step\)\. .*--resume-with",
    ):
        train(resumed(config, seed=1, micro_batch_size=2))
    assert snapshot(out) == before
    with caplog.at_level(logging.INFO, logger="posttrain"):
        result = train(resumed(config, seed=1, resume_with_changes=True, lr=1e-3))
    assert result.steps == 6
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "resuming with changed settings" in said
    assert "lr: 0.003 != 0.001" in said and "seed: 0 != 1" in said


def test_changed_training_data_is_refused(finished, workdir, tmp_path) -> None:
    config, out = finished
    cut_final(out)
    data = tmp_path / "train.jsonl"
    lines = (workdir / "train.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")
    # Same file name in the config: only the content changed.
    (workdir / "train.jsonl").rename(tmp_path / "original.jsonl")
    data.rename(workdir / "train.jsonl")
    try:
        with pytest.raises(ValueError, match="the training data"):
            train(resumed(config))
    finally:
        (workdir / "train.jsonl").unlink()
        (tmp_path / "original.jsonl").rename(workdir / "train.jsonl")


# Each optimizer setting a resume accepts as changed (issue 21, 1), with a new value.
ACCEPTED_CHANGES = [
    ("lr", 1e-3),
    ("lr_scheduler", "linear"),
    ("warmup_steps", 5),
    ("min_lr_ratio", 0.5),
    ("weight_decay", 0.3),
    ("adam_beta1", 0.5),
    ("adam_beta2", 0.9),
    ("adam_eps", 1e-2),
    ("max_grad_norm", 1e-4),
]


@pytest.mark.parametrize(("name", "value"), ACCEPTED_CHANGES)
def test_a_changed_optimizer_setting_takes_effect_from_the_resumed_step(
    finished, name, value
) -> None:
    import torch
    from safetensors.torch import load_file

    from posttrain.common.distributed import DistInfo
    from posttrain.engine.metrics import read_metrics
    from posttrain.engine.optim import lr_lambda
    from posttrain.engine.settings import RunSettings
    from posttrain.engine.setup import prepare_run
    from posttrain.sft.method import SFT

    config, out = finished
    uninterrupted = load_file(out / "final" / "model.safetensors")
    cut_final(out)
    changed = resumed(config, **{name: value})
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = prepare_run(SFT(changed), RunSettings.of(changed), cpu)
    assert run.start_step == 4
    factor = lr_lambda(changed.lr_scheduler, changed.warmup_steps, changed.min_lr_ratio, 6)(4)
    assert run.scheduler.get_last_lr()[0] == pytest.approx(changed.lr * factor)
    decayed, plain = run.optimizer.param_groups
    assert decayed["lr"] == pytest.approx(changed.lr * factor)
    assert decayed["betas"] == (changed.adam_beta1, changed.adam_beta2)
    assert decayed["eps"] == changed.adam_eps == plain["eps"]
    assert (decayed["weight_decay"], plain["weight_decay"]) == (changed.weight_decay, 0.0)
    train(changed)
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "lr" in r}
    expected = lr_lambda(changed.lr_scheduler, changed.warmup_steps, changed.min_lr_ratio, 6)
    for step in (5, 6):
        assert rows[step]["lr"] == pytest.approx(changed.lr * expected(step - 1))
    if name == "max_grad_norm":
        assert rows[5]["grad_norm"] > value  # so the tiny clip norm did act
    final = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], uninterrupted[k]) for k in final)
    # What final/ records is what was trained.
    saved = (out / "final" / "config.yaml").read_text()
    assert f"{name}: {value}" in saved or f"{name}: {value!r}" in saved
