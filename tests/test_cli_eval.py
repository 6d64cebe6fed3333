"""`posttrain eval` end to end on a tiny saved model: files, fields, wiring, bad input,
and two gloo ranks under torchrun against one process (this file is also the worker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from posttrain.cli.main import main
from posttrain.evaluation.answers import SAMPLE_FIELDS

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = {
    "accuracy",
    "format_rate",
    "answer_accuracy",
    "mean_response_length",
    "truncated_fraction",
    "mean_entropy",
    "num_prompts",
    "num_samples",
    "n",
    "generated_tokens",
    "seconds",
    "generated_tokens_per_s",
}
GSM8K_ROWS = [
    {"question": "What is 12 + 30?", "answer": "12 + 30 = <<12+30=42>>42\n#### 42"},
    {"question": "Natalia sold clips to 48 of her friends.", "answer": "#### 48"},
    {"question": "Hello, world!", "answer": "#### 7"},
    {"question": "The quick brown fox jumps over the lazy dog.", "answer": "#### 1,250"},
    {"question": "Reverse the word: posttrain", "answer": "#### 0"},
]


@pytest.fixture(scope="module")
def data(workdir: Path) -> Path:
    path = workdir / "gsm8k_like.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS), encoding="utf-8")
    return path


def eval_argv(workdir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--model", str(workdir / "model"),
        "--data", str(data),
        "--reward", "gsm8k",
        "--prompt-field", "question",
        "--max-new-tokens", "6",
        "--batch-size", "2",
        "--output-dir", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def read_run(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return summary, rows


def test_eval_writes_the_summary_and_generations(workdir, data, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    argv = eval_argv(workdir, data, out, "--n", "2", "--temperature", "1.0", "--limit", "4")
    assert main(argv) == 0
    summary, rows = read_run(out)
    assert SUMMARY_KEYS | {"pass@2", "mean@2"} <= set(summary)
    assert summary["num_prompts"] == 4 and summary["num_samples"] == 8
    assert summary["config"]["reward"] == "gsm8k" and summary["config"]["limit"] == 4
    assert [(r["index"], r["sample"]) for r in rows] == [(i, k) for i in range(4) for k in (0, 1)]
    assert all(tuple(r) == SAMPLE_FIELDS for r in rows)
    assert rows[0]["prompt"] == GSM8K_ROWS[0]["question"]
    assert rows[0]["gold"] == GSM8K_ROWS[0]["answer"]
    assert all(r["num_tokens"] <= 6 for r in rows)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "pass@2" in printed and "examples:" in printed
    assert printed.count("      gold:") == 3
    # The same directory again: refused, then replaced with --overwrite.
    assert main(argv) == 2
    assert "already holds a run (summary.json, generations.jsonl)" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_template_chat_and_stops_reach_the_engine(workdir, data, tmp_path, monkeypatch) -> None:
    import posttrain.evaluation.answers as answer_eval

    calls: list[dict[str, Any]] = []

    def capture(model, tokenizer, prompts, golds, reward_fn, **kwargs):
        calls.append({"prompts": prompts, "tokenizer": tokenizer, **kwargs})
        return answer_eval.EvalResult({"accuracy": 0.0}, [])

    monkeypatch.setattr(answer_eval, "evaluate_answers", capture)
    base = eval_argv(workdir, data, tmp_path / "a", "--prompt-template", "r1_zero", "--chat")
    assert main(base) == 0
    (call,) = calls
    tokenizer = call["tokenizer"]
    text = tokenizer.decode(call["prompts"][0])
    assert text.startswith("<|im_start|>user\nA conversation between User and Assistant.")
    assert "User: What is 12 + 30?\nAssistant: <think><|im_end|>" in text
    assert call["stop"] == ("</answer>",)  # r1_zero's own
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert call["stop_token_ids"] == [im_end, tokenizer.eos_token_id]
    argv = eval_argv(workdir, data, tmp_path / "b", "--stop", "\n", "--stop", "####")
    assert main(argv) == 0
    assert calls[1]["stop"] == ("\n", "####") and calls[1]["prompts"][0] == "What is 12 + 30?"


def test_a_yaml_config_fills_the_settings_and_flags_override(
    workdir, data, tmp_path, monkeypatch
) -> None:
    import posttrain.evaluation.answers as answer_eval

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(
        answer_eval,
        "evaluate_answers",
        lambda *a, **kw: seen.append(kw) or answer_eval.EvalResult({"accuracy": 0.0}, []),
    )
    config = tmp_path / "eval.yaml"
    config.write_text("n: 3\ntemperature: 0.7\nstop: ['</answer>']\nseed: 5\n", encoding="utf-8")
    argv = [*eval_argv(workdir, data, tmp_path / "o"), "--config", str(config), "--n", "2"]
    assert main(argv) == 0
    assert (seen[0]["n"], seen[0]["temperature"], seen[0]["seed"]) == (2, 0.7, 5)
    assert seen[0]["stop"] == ("</answer>",)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"stop": "</answer>"}, {"stop": ["</answer>"]}),  # one string is a one-item list
        ({"limit": "none", "chat": "yes", "n": "2", "temperature": "1e0"}, {"limit": None}),
        ({"max_new_tokens": "1_024", "top_p": 1}, {"max_new_tokens": 1024, "top_p": 1.0}),
    ],
)
def test_eval_config_values_are_coerced(values, expected) -> None:
    from posttrain.config.eval import EvalConfig, dataclass_from_dict

    cfg = dataclass_from_dict(EvalConfig, {"model": "m", "data": "d", "reward": "r", **values})
    assert {key: getattr(cfg, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n": True}, "n must be int, got bool True"),
        ({"n": 1.5}, "n must be int, got float 1.5"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"stop": ["a", ""]}, "stop must hold non-empty strings"),
        ({"stop": [3]}, r"stop\[0\] must be str, got int 3"),
        ({"model": None}, "missing required setting\\(s\\) model: pass --model"),
        ({"output_dirr": "x"}, "unknown config key 'output_dirr' in f.yaml: did you mean"),
    ],
)
def test_eval_config_errors_name_the_setting(values, message) -> None:
    from posttrain.config.eval import EvalConfig, dataclass_from_dict

    with pytest.raises(ValueError, match=message):
        dataclass_from_dict(
            EvalConfig, {"model": "m", "data": "d", "reward": "r", **values}, "f.yaml"
        )


@pytest.fixture(scope="module")
def no_eos_model(workdir: Path, tmp_path_factory) -> Path:
    from posttrain.engine.checkpoints import load_pretrained

    path = tmp_path_factory.mktemp("no_eos")
    model, tokenizer = load_pretrained(workdir / "model")
    tokenizer.eos_token = None
    tokenizer.chat_template = None
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bad_input_cases(tmp: Path, workdir: Path, data: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (flags to add or replace, the one-line error expected)."""
    no_answer = tmp / "no_answer.jsonl"
    no_answer.write_text('{"question": "q", "answer": "1"}\n{"question": "q", "sol": "2"}\n')
    fixed = tmp / "fixed.txt"
    fixed.write_text("Always the same prompt\n")
    rewards = tmp / "rewards.py"
    rewards.write_text("def mine(response, gold):\n    return {}\n")
    return {
        "unknown reward": (
            ["--reward", "gsm9k"],
            "unknown reward 'gsm9k': use one of gsm8k, math, r1_zero, mmlu, exact",
        ),
        "missing answer field": (
            ["--data", str(no_answer)],
            f"{no_answer}:2: missing field 'answer' (nor 'response', 'completion'); "
            "fields present: 'question', 'sol'. Set --answer-field",
        ),
        "golds the reward cannot score": (
            ["--reward", "mmlu"],
            f"{data}:1: gold answer '12 + 30 = <<12+30=42>>42\\n#### 42' is not a valid gold "
            "for reward 'mmlu': it must be one option letter, A to D",
        ),
        "template": (["--prompt-template", str(fixed)], "has no {question} placeholder"),
        "reward file": (["--reward", f"{tmp}/nope.py:mine"], "reward file not found"),
        "reward function": (["--reward", f"{rewards}:yours"], "has no 'yours'; callables"),
        "no eos": (["--model", str(tmp / "no_eos")], "has no EOS token"),
        "max new tokens": (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        "greedy n": (["--n", "4"], "n is 4 but temperature is 0"),
        "yaml key": (["--config", str(tmp / "bad.yaml")], "did you mean 'temperature'?"),
    }


def test_training_and_test_files_need_no_field_flags(workdir, tmp_path) -> None:
    """The shared GSM8K files as they are: the test set (question / answer) and the
    training file (prompt / completion), one field rule for both."""
    shared = ROOT.parent / "shared" / "data"
    for name in ("gsm8k_test.jsonl", "gsm8k_512.jsonl"):
        out = tmp_path / name
        argv = ["eval", "--model", str(workdir / "model"), "--data", str(shared / name)]
        argv += ["--reward", "gsm8k", "--limit", "2", "--max-new-tokens", "2"]
        assert main([*argv, "--output-dir", str(out), "--no-progress"]) == 0, name
        summary, rows = read_run(out)
        first = json.loads((shared / name).read_text(encoding="utf-8").splitlines()[0])
        assert rows[0]["prompt"] == first.get("prompt", first.get("question")), name
        assert rows[0]["gold"] == first.get("answer", first.get("completion")), name
        assert summary["config"]["prompt_field"] is None


def test_bad_input_is_one_clear_line(workdir, data, no_eos_model, tmp_path, capsys) -> None:
    os.symlink(no_eos_model, tmp_path / "no_eos")
    (tmp_path / "bad.yaml").write_text("temprature: 1.0\n")
    for name, (flags, message) in bad_input_cases(tmp_path, workdir, data).items():
        argv = [*eval_argv(workdir, data, tmp_path / "out"), *flags]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
        assert err.count("\n") == 1 and err.startswith("posttrain eval: error: "), (name, err)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_help_and_setting_errors_never_import_torch() -> None:
    code = (
        "import sys\n"
        "from posttrain.cli.main import main\n"
        "for argv in (['eval', '--help'], ['eval', '--model', 'm', '--data', 'd', '--reward', "
        "'gsm8k', '--n', '3'], ['eval', '--temprature', '1']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print([m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.stdout.strip().endswith("[]"), done.stdout[-2000:] + done.stderr[-2000:]
    assert "n is 3 but temperature is 0" in done.stderr
    assert "did you mean --temperature?" in done.stderr


# --------------------------------------------------------------------------- two ranks

JOBS = {
    "sampled": ["--n", "2", "--temperature", "1.0", "--seed", "11"],
    "greedy": ["--stop", "a"],
}


def _worker(jobs_file: str) -> int:
    """Run each job's `posttrain eval` arguments on this rank (under torchrun)."""
    import torch.distributed as dist

    # One process group for every job, as tests/test_distributed.py explains.
    dist.init_process_group("gloo")
    jobs = json.loads(Path(jobs_file).read_text(encoding="utf-8"))
    codes = {name: main(argv) for name, argv in jobs.items()}
    Path(f"{jobs_file}.rank{dist.get_rank()}.json").write_text(json.dumps(codes))
    dist.destroy_process_group()
    return 0


def test_two_gloo_ranks_equal_one_process(workdir, data, tmp_path) -> None:
    jobs = {
        name: eval_argv(workdir, data, tmp_path / f"two-{name}", *e) for name, e in JOBS.items()
    }
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # A session of its own, so that a timeout kills torchrun and both workers.
    proc = subprocess.Popen(
        [*cmd, __file__, str(jobs_file)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the two-rank evals did not finish in 180 s:\n{proc.communicate()[1][-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    for rank in (0, 1):
        codes = json.loads(Path(f"{jobs_file}.rank{rank}.json").read_text())
        assert codes == {"sampled": 0, "greedy": 0}, stderr[-4000:]
    volatile = {"seconds", "generated_tokens_per_s", "config"}
    for name, extra in JOBS.items():
        assert main(eval_argv(workdir, data, tmp_path / f"one-{name}", *extra)) == 0
        two_summary, two_rows = read_run(tmp_path / f"two-{name}")
        one_summary, one_rows = read_run(tmp_path / f"one-{name}")
        assert two_rows == one_rows, name
        assert len(one_rows) == len(GSM8K_ROWS) * (2 if name == "sampled" else 1)
        strip = lambda s: {k: v for k, v in s.items() if k not in volatile}  # noqa: E731
        assert strip(two_summary) == strip(one_summary), name
    sampled = read_run(tmp_path / "one-sampled")[1]
    # Sampling really sampled: the two samples of a prompt differ somewhere.
    assert any(
        a["response"] != b["response"] for a, b in zip(sampled[::2], sampled[1::2], strict=True)
    )


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
