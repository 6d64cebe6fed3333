"""Metrics: the JSONL log, its truncation on resume, trackers, progress output and the plot."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from posttrain.config import SFTConfig, config_to_dict
from posttrain.engine.metrics import (
    MetricsLogger,
    ProgressReporter,
    peak_rss_bytes,
    plot_metrics,
    read_metrics,
)

TRAIN = {
    "loss": 2.5,
    "lr": 2e-5,
    "grad_norm": 0.7,
    "entropy": 3.1,
    "token_accuracy": 0.25,
    "tokens_per_s": 1500.0,
}
EVAL = {"eval_loss": 2.0, "eval_perplexity": 7.39, "eval_entropy": 2.9, "eval_token_accuracy": 0.3}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_log_writes_one_flushed_json_line_per_call(tmp_path: Path) -> None:
    cfg = SFTConfig(model="m", train_file="t", output_dir=str(tmp_path))
    logger = MetricsLogger(tmp_path, config_to_dict(cfg))
    logger.log(1, {**TRAIN, "loss": torch.tensor(2.5)})  # tensors become numbers
    # Readable before close: every line is flushed as it is written.
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, **TRAIN}]
    logger.log(2, EVAL)
    logger.close()
    logger.close()  # idempotent
    lines = _lines(tmp_path / "metrics.jsonl")
    assert lines[1] == {"step": 2, **EVAL}
    assert list(lines[0]) == ["step", *TRAIN]


def test_resume_drops_lines_past_the_resumed_step(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, {"report_to": "none"}) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
        logger.log(4, EVAL)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 6, "lo')  # torn by a kill mid-write
    with MetricsLogger(tmp_path, None, resume_step=3) as logger:
        logger.log(4, {"loss": 40.0})
    lines = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss")) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # A fresh (not resumed) run starts the file over.
    with MetricsLogger(tmp_path, None) as logger:
        logger.log(1, {"loss": 9.0})
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 9.0}]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", {"report_to": "wandb"}, enabled=False)
    logger.log(1, TRAIN)
    logger.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_missing_tracker_package_is_a_clear_error_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: str
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # makes `import tracker` fail
    cfg = SFTConfig(model="m", train_file="t", report_to=tracker)
    with pytest.raises(ImportError, match=rf"report_to='{tracker}' needs `pip install {tracker}`"):
        MetricsLogger(tmp_path, config_to_dict(cfg))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_gets_the_metrics_and_resumes_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeRun:
        id = "run123"

        def log(self, data: dict[str, Any], step: int) -> None:
            calls.append(("log", (step, data)))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: Any) -> FakeRun:
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(tmp_path, {"report_to": "wandb", "lr": 1e-3}) as logger:
        logger.log(1, {"loss": 2.0})
    assert calls[0][1]["config"] == {"report_to": "wandb", "lr": 1e-3}
    assert calls[1:] == [("log", (1, {"loss": 2.0})), ("finish", None)]
    calls.clear()
    MetricsLogger(tmp_path, {"report_to": "wandb"}, resume_step=1).close()
    assert calls[0][1]["id"] == "run123"


def test_progress_without_a_terminal_prints_plain_lines() -> None:
    stream = io.StringIO()
    progress = ProgressReporter(total_steps=10, stream=stream)
    progress.update(1)  # no metrics: nothing to print without a bar
    progress.update(2, {"loss": 1.234567, "lr": 2e-5, "tokens_per_s": 12345.6})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("step 2/10 | loss 1.2346 | lr 2.00e-05 | tok/s 12,346")
    quiet = io.StringIO()
    ProgressReporter(10, enabled=False, stream=quiet).update(1, {"loss": 1.0})
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_draws_a_bar() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with ProgressReporter(total_steps=4, stream=stream) as progress:
        for step in range(1, 5):
            progress.update(step, {"loss": 1.5, "lr": 1e-4} if step % 2 == 0 else None)
    out = stream.getvalue()
    assert "4/4" in out and "loss 1.5000" in out


def test_no_progress_turns_the_bar_into_plain_lines(workdir, tmp_path, capsys) -> None:
    """--no-progress on a terminal: no bar, but every metrics and eval line still prints
    (issue 21, 12: it used to hide them all)."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = ProgressReporter(total_steps=4, stream=stream, bar=False)
    progress.update(1)
    progress.update(2, {"loss": 1.5})
    progress.update(2, {"eval_loss": 1.25})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [
        ["step 2/4", "loss 1.5000"],
        ["step 2/4", "eval_loss 1.2500"],
    ]
    from helpers import make_config

    from posttrain.sft.train import train

    train(make_config(workdir, tmp_path / "run", max_steps=2, progress=False))
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in printed] == ["step 1/2", "step 2/2"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, None) as logger:
        for step in range(1, 11):
            logger.log(step, {**TRAIN, "loss": 3.0 / step, "lr": 1e-4 * (1 - step / 10)})
            if step % 5 == 0:
                logger.log(step, {**EVAL, "eval_loss": 3.5 / step})
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run that logged nothing still gets a (mostly empty) plot rather than a crash.
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "empty.png").stat().st_size > 0
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 12


def test_peak_rss_is_plausible() -> None:
    assert 10 * 2**20 < peak_rss_bytes() < 1 << 40
