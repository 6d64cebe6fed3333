"""`posttrain demo` and `posttrain generate`: the task, the tokenizer, a short run end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli.main import main
from posttrain.demo.run import MARKER_FILE, prepare_output_dir, run_demo, train_char_tokenizer
from posttrain.demo.task import (
    MAX_LETTERS,
    MIN_LETTERS,
    PROMPT_PREFIX,
    PROMPT_SUFFIX,
    DemoError,
    make_reversal_examples,
    reversal_prompt,
)
from posttrain.generation.decode import greedy_generate

# Long enough for accuracy to climb far above the untrained model's ~0% (about 60-70%
# at 150 steps; the full demo runs 400), short enough for about 30 s on two busy cores.
SHORT_STEPS = 150
NUM_EVAL = 100


# --------------------------------------------------------------------------- the task


def word_of(prompt: str) -> str:
    assert prompt.startswith(PROMPT_PREFIX) and prompt.endswith(PROMPT_SUFFIX)
    return prompt[len(PROMPT_PREFIX) : -len(PROMPT_SUFFIX)]


def test_reversal_examples_are_correct_and_held_out() -> None:
    train, held_out = make_reversal_examples(2000, 200, seed=3)
    assert len(train) == 2000 and len(held_out) == 200
    for row in train + held_out:
        word = word_of(row["prompt"])
        assert MIN_LETTERS <= len(word) <= MAX_LETTERS
        assert word.isalpha() and word.islower()
        assert row["response"] == word[::-1]
    train_words = {word_of(r["prompt"]) for r in train}
    assert len(train_words) == len(train)
    assert not train_words & {word_of(r["prompt"]) for r in held_out}
    assert {len(w) for w in train_words} == set(range(MIN_LETTERS, MAX_LETTERS + 1))


def test_reversal_examples_are_deterministic_per_seed() -> None:
    assert make_reversal_examples(500, 50, seed=7) == make_reversal_examples(500, 50, seed=7)
    assert make_reversal_examples(500, 50, seed=7) != make_reversal_examples(500, 50, seed=8)


def test_char_tokenizer_splits_exactly_at_the_prompt_boundary() -> None:
    train, _ = make_reversal_examples(300, 1, seed=0)
    tok = train_char_tokenizer(r["prompt"] + r["response"] for r in train)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    prompt, response = reversal_prompt("stressed"), "desserts"
    p, r = tok(prompt)["input_ids"], tok(response, add_special_tokens=False)["input_ids"]
    assert p + r == tok(prompt + response)["input_ids"]
    assert len(p) == len(prompt) and len(r) == len(response)
    assert tok.decode(p + r + [tok.eos_token_id], skip_special_tokens=True) == prompt + response
    # Same data, same ids: a rerun with the same seed builds the same tokenizer.
    assert (
        tok.get_vocab()
        == train_char_tokenizer(r["prompt"] + r["response"] for r in train).get_vocab()
    )


def test_output_dir_is_never_mixed_or_wrongly_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepare_output_dir(run, overwrite=False)  # new: created
    (run / MARKER_FILE).write_text("{}")
    with pytest.raises(DemoError, match="--overwrite"):
        prepare_output_dir(run, overwrite=False)
    prepare_output_dir(run, overwrite=True)
    assert run.is_dir() and not any(run.iterdir())

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not deleting"):
        prepare_output_dir(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="--max-steps"):
        run_demo(tmp_path / "run", max_steps=0, echo=None)
    assert not (tmp_path / "run").exists()


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--output-dir", "--seed", "--max-steps", "--overwrite"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--max-new-tokens"):
        assert flag in text


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One shortened demo, shared by the tests below (about 30 s)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    threads = torch.get_num_threads()
    summary = run_demo(out, seed=0, max_steps=SHORT_STEPS, progress=False, num_eval=NUM_EVAL)
    assert torch.get_num_threads() == threads  # the demo's thread setting doesn't leak
    return out, summary


def test_short_demo_learns_the_task(demo_run: tuple[Path, dict]) -> None:
    out, summary = demo_run
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "final_loss", "train_seconds"):
        assert key in on_disk
    assert on_disk["accuracy_before"] == summary["accuracy_before"]
    assert summary["accuracy_before"] <= 0.05
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.3, summary
    assert summary["steps"] == SHORT_STEPS
    for name in ("train.jsonl", "eval.jsonl", "metrics.jsonl", "final", "base_model"):
        assert (out / name).exists(), name
    assert summary["plot_path"] and Path(summary["plot_path"]).is_file()
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_EVAL and set(rows[0]) == {"prompt", "response"}


def test_held_out_accuracy_rises_during_training(demo_run: tuple[Path, dict]) -> None:
    out, summary = demo_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    assert len(curve) >= 10 and curve[-1][0] == SHORT_STEPS
    assert curve[-1][1] >= curve[0][1] + 0.3, curve
    # The last point scores the same weights as the summary's "after", in memory.
    assert curve[-1][1] == pytest.approx(summary["accuracy_after"])
    assert (out / "generations" / f"step_{SHORT_STEPS:06d}.jsonl").is_file()


def test_posttrain_eval_reproduces_the_after_accuracy(
    demo_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out, summary = demo_run
    argv = ["eval", "--model", str(out / "final"), "--data", str(out / "eval.jsonl")]
    argv += ["--reward", "exact", "--answer-field", "response", "--max-new-tokens", "9"]
    argv += ["--output-dir", str(tmp_path / "eval"), "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["accuracy_after"])
    assert result["num_prompts"] == NUM_EVAL


def test_final_model_loads_with_auto_classes(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.model_type in ("llama", "qwen2")
    assert tokenizer.eos_token_id == model.config.eos_token_id


def test_second_run_into_same_dir_asks_for_overwrite(
    demo_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = demo_run
    before = sorted(p.name for p in out.iterdir())
    assert main(["demo", "--output-dir", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_generate_prints_the_completion_up_to_eos(
    demo_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = demo_run
    prompt = reversal_prompt("stressed")
    assert main(["generate", "--model", str(out / "final"), "--prompt", prompt]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and printed.count("\n") == 1
    completion = printed[:-1]
    assert "</s>" not in completion

    # The completion is exactly the greedy tokens before the first EOS, by a plain
    # argmax loop that doesn't stop there.
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = tokenizer(prompt)["input_ids"]
    new_ids: list[int] = []
    with torch.inference_mode():
        for _ in range(20):
            logits = model(input_ids=torch.tensor([ids + new_ids])).logits
            new_ids.append(int(logits[0, -1].argmax()))
    assert tokenizer.eos_token_id in new_ids, "the trained model should emit EOS"
    cut = new_ids.index(tokenizer.eos_token_id)
    assert completion == tokenizer.decode(new_ids[:cut])
    assert greedy_generate(model, tokenizer, [prompt])[0] == completion


def test_generate_reports_a_missing_model_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


# --------------------------------------------------------------------------- stopping


def test_demo_flag_errors_answer_before_torch(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cases = {
        ("--max-steps", "0"): "--max-steps must be at least 1, got 0",
        ("--seed", "-1"): "--seed must be in [0, 2**32), got -1",
        ("--output-dir", str(tmp_path / "busy")): f"output_dir {tmp_path / 'busy'} is not empty",
    }
    for flags, message in cases.items():
        code = (
            "import sys\n"
            "from posttrain.cli.main import main\n"
            f"code = main(['demo', *{list(flags)!r}])\n"
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], code)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert "HEAVY [] 2" in done.stdout, done.stdout + done.stderr
        assert f"posttrain demo: error: {message}" in done.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_demo_stopped_by_sigterm_during_training_is_one_line(tmp_path: Path) -> None:
    """It ended in a 25-line TrainingInterrupted traceback and exit 1."""
    out = tmp_path / "demo"
    argv = ["--output-dir", str(out), "--max-steps", "100000", "--seed", "3", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "demo", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        # A first metrics line: the training loop is running (and handles the signal).
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or '"loss"' not in (
            out / "metrics.jsonl"
        ).read_text(encoding="utf-8"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.startswith("posttrain demo: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("posttrain demo: stopped by SIGTERM after training step "), err
    rerun = f"posttrain demo --output-dir {out} --overwrite --seed 3 --max-steps 100000"
    assert lines[0].endswith(f"run it again with: {rerun} --no-progress"), err


def test_demo_ctrl_c_outside_training_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import posttrain.demo.run as demo_run_module

    def interrupted(**kwargs: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_run_module, "run_demo", interrupted)
    assert main(["demo", "--output-dir", str(tmp_path / "d")]) == 130
    err = capsys.readouterr().err
    assert err == (
        "posttrain demo: stopped by SIGINT; a demo does not resume, run it again with: "
        f"posttrain demo --output-dir {tmp_path / 'd'} --overwrite\n"
    )
