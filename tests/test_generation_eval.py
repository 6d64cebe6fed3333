"""Generation evaluation during `posttrain sft`: accuracy logged, samples written, and the
same numbers as `posttrain eval` on the saved model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import make_config

from posttrain.cli.main import main
from posttrain.config import SFTConfig
from posttrain.sft.train import train


def test_sft_logs_accuracy_and_matches_posttrain_eval(workdir, tmp_path, caplog) -> None:
    out = tmp_path / "run"
    config = make_config(
        workdir,
        out,
        max_steps=4,
        eval_generate_file=str(workdir / "eval.jsonl"),
        eval_generate_every=2,
        eval_generate_limit=10,
        eval_max_new_tokens=8,
        reward="exact",
    )
    with caplog.at_level(logging.INFO, logger="posttrain"):
        train(config)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "generation evaluation: greedy answers to 10 prompts" in said
    assert "every 2 steps and at the end" in said
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_format_rate"] <= 1
        assert 0 < r["eval_mean_response_length"] <= 8
    samples = [
        json.loads(x) for x in (out / "generations" / "step_000004.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 10 and (out / "generations" / "step_000002.jsonl").exists()
    gold = [json.loads(x)["response"] for x in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [s["gold"] for s in samples] == gold[:10]
    assert evals[-1]["eval_accuracy"] == pytest.approx(
        sum(s["reward"] for s in samples) / len(samples)
    )

    # `posttrain eval` on the saved model gives the same answers and accuracy.
    eval_dir = tmp_path / "eval"
    argv = ["eval", "--model", str(out / "final"), "--data", str(workdir / "eval.jsonl")]
    argv += ["--reward", "exact", "--answer-field", "response", "--limit", "10"]
    argv += ["--max-new-tokens", "8", "--output-dir", str(eval_dir), "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(evals[-1]["eval_accuracy"])
    again = [json.loads(x) for x in (eval_dir / "generations.jsonl").read_text().splitlines()]
    assert [s["response"] for s in again] == [s["response"] for s in samples]


def test_generation_eval_input_errors_come_before_training(workdir, tmp_path) -> None:
    base = make_config(workdir, tmp_path / "run", max_steps=2)
    with pytest.raises(ValueError, match="no reward"):
        SFTConfig(**{**base.__dict__, "eval_generate_file": str(workdir / "eval.jsonl")})
    bad_reward = SFTConfig(
        **{**base.__dict__, "eval_generate_file": str(workdir / "eval.jsonl"), "reward": "nope"}
    )
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        train(bad_reward)
    bad_field = SFTConfig(
        **{
            **bad_reward.__dict__,
            "reward": "exact",
            "eval_answer_field": "gold",
            "output_dir": str(tmp_path / "run2"),
        }
    )
    with pytest.raises(ValueError, match="missing field 'gold'"):
        train(bad_field)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_plot_shows_held_out_accuracy(tmp_path: Path) -> None:
    from posttrain.engine.metrics import plot_metrics, plot_panels, read_metrics

    lines = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 5)]
    lines += [{"step": 2, "eval_accuracy": 0.25}, {"step": 4, "eval_accuracy": 0.75}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert plot_panels(read_metrics(path)) == ["loss", "held-out accuracy", "lr"]
    assert plot_panels(read_metrics(path)[:4]) == ["loss", "lr"]
    png = plot_metrics(path, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
