"""`posttrain demo --rl`: a short SFT, then GRPO from the SFT model, scored before and
after RL. The end-to-end run here is shrunk (a few RL steps of 4 words x 4 samples); the
five-minute demo itself is measured by hand (README, "The demo")."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

import posttrain.cli.demo as cli_demo
from posttrain.cli.main import main
from posttrain.demo.task import RLDemoSettings
from posttrain.engine.loop import TrainingInterrupted

# Enough SFT for the model to answer some short words right (so RL has groups with a
# reward spread), few enough RL steps for a few seconds.
TINY = RLDemoSettings(
    sft_steps=90,
    rl_steps=4,
    num_eval=40,
    questions_per_step=8,
    group_size=4,
    micro_batch_size=16,
    eval_every=2,
)
SUMMARY_KEYS = ("accuracy_sft", "accuracy_rl", "mean_at_8_sft", "mean_at_8_rl")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def rl_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """`posttrain demo --rl` through the CLI with the tiny settings as its defaults."""
    out = tmp_path_factory.mktemp("demo_rl") / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(cli_demo, "RL_DEFAULTS", TINY)
        code = main(["demo", "--rl", "--output-dir", str(out), "--no-progress"])
    assert code == 0, printed.getvalue()
    return out, json.loads((out / "summary.json").read_text()), printed.getvalue()


def test_rl_demo_writes_both_runs_and_the_summary(
    rl_demo: tuple[Path, dict[str, Any], str],
) -> None:
    out, summary, printed = rl_demo
    for key in SUMMARY_KEYS:
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["sft_steps"] == TINY.sft_steps and summary["rl_steps"] == TINY.rl_steps
    assert summary["num_eval"] == TINY.num_eval
    for name in ("train.jsonl", "eval.jsonl", "base_model", "demo_config.json"):
        assert (out / name).exists(), name
    for run in ("sft", "rl"):
        assert (out / run / "final" / "model.safetensors").is_file(), run
        assert (out / run / "metrics.jsonl").is_file(), run
    assert summary["model_dir"] == str(out / "rl" / "final")
    assert summary["plot_path"] == str(out / "rl" / "metrics.png")
    assert Path(summary["plot_path"]).is_file()
    assert len(list((out / "rl" / "rollouts").glob("step_*.jsonl"))) == TINY.rl_steps
    assert json.loads((out / "demo_config.json").read_text())["rl_steps"] == TINY.rl_steps
    # The report names both numbers of each measure, as stored.
    assert "posttrain demo --rl: done" in printed
    assert f"{summary['accuracy_sft']:.1%} after SFT -> {summary['accuracy_rl']:.1%}" in printed
    assert f"{summary['mean_at_8_sft']:.1%} -> {summary['mean_at_8_rl']:.1%}" in printed


def test_rl_starts_from_the_sft_model_and_changes_it(
    rl_demo: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, _ = rl_demo
    config = yaml.safe_load((out / "rl" / "final" / "config.yaml").read_text())
    assert Path(config["model"]) == out / "sft" / "final"
    sft = load_file(out / "sft" / "final" / "model.safetensors")
    rl = load_file(out / "rl" / "final" / "model.safetensors")
    assert sft.keys() == rl.keys()
    assert any(not sft[k].equal(rl[k]) for k in sft), "RL did not update the SFT weights"
    rows = read_metrics(out / "rl" / "metrics.jsonl")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, TINY.rl_steps + 1))
    # The SFT model answers some words: RL starts with a reward, not from zero.
    assert steps[0]["reward"] > 0.0, steps[0]


def test_accuracies_score_the_saved_sft_and_rl_models(
    rl_demo: tuple[Path, dict[str, Any], str],
) -> None:
    """accuracy_sft is the SFT run's last held-out evaluation and accuracy_rl the RL
    run's: the same greedy scoring of the same weights, in memory and from disk."""
    out, summary, _ = rl_demo
    sft_rows = read_metrics(out / "sft" / "metrics.jsonl")
    sft_curve = [r["eval_accuracy"] for r in sft_rows if "eval_accuracy" in r]
    rl_rows = read_metrics(out / "rl" / "metrics.jsonl")
    rl_curve = [(r["step"], r["eval_accuracy"]) for r in rl_rows if "eval_accuracy" in r]
    assert summary["accuracy_sft"] == pytest.approx(sft_curve[-1])
    assert [s for s, _ in rl_curve] == list(range(TINY.eval_every, TINY.rl_steps + 1, 2))
    assert summary["accuracy_rl"] == pytest.approx(rl_curve[-1][1])


# --------------------------------------------------------------------------- the CLI


def test_rl_help_and_flag_errors_answer_before_torch(tmp_path: Path) -> None:
    cases = {
        ("--rl", "--help"): ("0", "--rl-steps"),
        ("--rl", "--rl-steps", "0"): ("2", "--rl-steps must be at least 1, got 0"),
        ("--rl-steps", "5"): ("2", "--rl-steps needs --rl"),
    }
    for flags, (expected_code, text) in cases.items():
        argv = ["demo", *flags, "--output-dir", str(tmp_path / "d")]
        code = (
            "import sys\n"
            "from posttrain.cli.main import main\n"
            "try:\n"
            f"    code = main({argv!r})\n"
            "except SystemExit as exit:\n"
            "    code = exit.code\n"
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], code)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert f"HEAVY [] {expected_code}" in done.stdout, done.stdout + done.stderr
        assert text in done.stdout + done.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("rl_started", "stage"), [(False, "SFT"), (True, "RL")], ids=["sft", "rl"])
def test_rl_demo_stopped_by_sigterm_is_one_line_naming_the_stage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rl_started: bool,
    stage: str,
) -> None:
    import posttrain.demo.rl as rl_module

    out = tmp_path / "d"

    def interrupted(output_dir: str, settings: RLDemoSettings, **kwargs: object) -> dict:
        assert settings == replace(RLDemoSettings(), seed=3, rl_steps=7)
        (Path(output_dir) / ("rl" if rl_started else "sft")).mkdir(parents=True)
        raise TrainingInterrupted(signal.SIGTERM, 5, None)

    monkeypatch.setattr(rl_module, "run_rl_demo", interrupted)
    argv = ["demo", "--rl", "--output-dir", str(out), "--seed", "3", "--rl-steps", "7"]
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert err == (
        f"posttrain demo: stopped by SIGTERM after {stage} step 5; a demo does not resume, "
        f"run it again with: posttrain demo --rl --output-dir {out} --overwrite --seed 3 "
        "--rl-steps 7\n"
    )


def test_rl_demo_ctrl_c_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import posttrain.demo.rl as rl_module

    def interrupted(**kwargs: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(rl_module, "run_rl_demo", interrupted)
    assert main(["demo", "--rl", "--output-dir", str(tmp_path / "d"), "--max-steps", "50"]) == 130
    assert capsys.readouterr().err == (
        "posttrain demo: stopped by SIGINT; a demo does not resume, run it again with: "
        f"posttrain demo --rl --output-dir {tmp_path / 'd'} --overwrite --max-steps 50\n"
    )
