"""The `posttrain` command line: version, negative numbers, misspelled and Hugging Face flags,
inspect's own settings, a model without a tokenizer, quiet first-run output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import write_jsonl
from transformers import PreTrainedModel, PreTrainedTokenizerFast

import posttrain
from posttrain.cli.main import join_negative_values, main

ROWS = [{"prompt": "Question: 1 + 1?", "response": " 2"}, {"prompt": "Hi", "response": " there"}]


def _exit_code(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"posttrain {posttrain.__version__}\n"
    assert posttrain.__version__ == "0.1.0"


def test_negative_numbers_are_values_not_options() -> None:
    joined = join_negative_values(["--lr", "-1e-4", "--seed", "3", "--adam-eps", "-.5E+2"])
    assert joined == ["--lr=-1e-4", "--seed", "3", "--adam-eps=-.5E+2"]
    # A non-number, a flag already given with `=`, and anything after `--` stay as they are.
    assert join_negative_values(["--x", "-v"]) == ["--x", "-v"]
    assert join_negative_values(["--x=-1", "-2"]) == ["--x=-1", "-2"]
    assert join_negative_values(["--", "--x", "-1e3"]) == ["--", "--x", "-1e3"]


def test_negative_flag_values_reach_the_range_checks(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse alone fails with "expected one argument" on `-1e-4`.
    assert main(["sft", "--model", "m", "--train-file", "t", "--lr", "-1e-4"]) == 2
    assert "posttrain sft: error: lr must be > 0, got -0.0001" in capsys.readouterr().err
    assert main(["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "-1"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["--micro-batch", "4"], "did you mean --micro-batch-size?"),  # no abbreviations
        (["--lr-schedular", "cosine"], "did you mean --lr-scheduler?"),
        (["--lerning-rate", "1e-4"], "did you mean --lr?"),
        (["--learning-rate", "1e-4"], "posttrain calls it --lr"),
        (["--per-device-train-batch-size=8"], "posttrain calls it --micro-batch-size"),
        (["--gradient-accumulation-steps", "2"], "posttrain calls it --grad-accum-steps"),
        (["--num-train-epochs", "2"], "posttrain calls it --epochs"),
        (["--max-seq-length", "512"], "posttrain calls it --max-seq-len"),
        (["--warmup-ratio", "0.1"], "no warmup ratio: set --warmup-steps"),
        (["--bf16"], "sets it with --precision"),
    ],
)
def test_unknown_flags_suggest_the_posttrain_flag(
    args: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(["sft", "--model", "m", "--train-file", "t", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"posttrain sft: error: unrecognized arguments: {' '.join(args)}; " in err
    assert hint in err


def test_several_unknown_flags_are_each_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["sft", "--logging-steps", "5", "--save-steps", "9", "--zzz"]) == 2
    err = capsys.readouterr().err
    assert "--logging-steps: posttrain calls it --log-every" in err
    assert "--save-steps: posttrain calls it --save-every" in err
    assert "--zzz:" not in err  # nothing close: no suggestion
    assert _exit_code(["generate", "--model", "m", "--prompt", "p", "--max-new-token", "3"]) == 2
    assert "did you mean --max-new-tokens?" in capsys.readouterr().err


def test_inspect_help_lists_only_what_inspect_uses(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["inspect", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--model", "--train-file", "--max-seq-len", "--micro-batch-size"):
        assert flag in text, flag
    for flag in ("--lr", "--save-every", "--resume", "--output-dir", "--precision"):
        assert flag not in text, flag


def _tokenizer_dir(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    model_dir = tmp_path / "tok"
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_inspect_takes_an_sft_config_file_and_flags(
    tmp_path: Path, nobos_tokenizer: PreTrainedTokenizerFast, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    sft_yaml = tmp_path / "sft.yaml"
    # Training-only settings inspect ignores, including values sft itself would refuse
    # together (resume with overwrite) and an eval_every without eval_file.
    sft_yaml.write_text(
        f"model: {_tokenizer_dir(tmp_path, nobos_tokenizer)}\ntrain_file: {data}\n"
        "lr: 1.0e-4\nsave_every: 10\neval_every: 5\nresume: true\noverwrite: true\n"
        "max_seq_len: 16\n",
        encoding="utf-8",
    )
    base = ["inspect", "--config", str(sft_yaml), "--json", "--plot", "none"]
    assert main([*base, "--lr", "3e-4", "--save-every", "2", "--max-steps", "none"]) == 0
    assert '"num_examples": 2' in capsys.readouterr().out
    # Unknown keys are still rejected, with the posttrain name.
    sft_yaml.write_text(sft_yaml.read_text() + "learning_rate: 1.0e-4\n", encoding="utf-8")
    assert main(base) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_model_without_tokenizer_files_is_one_clear_line(
    tmp_path: Path,
    tiny_qwen2: PreTrainedModel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir = tmp_path / "no-tokenizer"
    tiny_qwen2.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    capsys.readouterr()
    assert main(["inspect", "--model", str(model_dir), "--train-file", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"posttrain inspect: error: {model_dir} has no tokenizer files" + (
        " (tokenizer.json or a vocabulary)"
    )
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi"]) == 2
    assert f"{model_dir} has no tokenizer files" in capsys.readouterr().err


def test_first_matplotlib_import_prints_nothing(tmp_path: Path) -> None:
    """A fresh font cache is built on the first plot; the CLI's INFO logging printed
    "generated new fontManager" (and, when that took over 5 s, "Matplotlib is building
    the font cache") into the run's output."""
    script = textwrap.dedent(
        """
        import logging, sys, threading, types
        from pathlib import Path

        class FireNow:  # matplotlib's 5 s timer for its warning, as on a slow machine
            def __init__(self, interval, function, *args, **kwargs):
                self.function = function
            def start(self):
                self.function()
            def cancel(self):
                pass

        threading.Timer = FireNow
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        # Only the metrics and JSONL modules: the package's __init__ imports torch.
        package = types.ModuleType("posttrain")
        package.__path__ = [sys.argv[1]]
        sys.modules["posttrain"] = package
        from posttrain.engine.metrics import plot_metrics

        out = Path(sys.argv[2])
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.001}\\n')
        plot_metrics(out / "metrics.jsonl", out / "metrics.png")
        """
    )
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mplconfig")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(Path(posttrain.__file__).parent), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "metrics.png").is_file()
    assert any((tmp_path / "mplconfig").iterdir())  # the cache was built in this run


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys) -> None:
    import posttrain.cli.inspect_data as inspect_data

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_data, "run", interrupted)
    assert main(["inspect", "--model", "m", "--train-file", "t"]) == 130
    assert capsys.readouterr().err == "posttrain inspect: interrupted\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["sft", "--help"],
        ["inspect", "--help"],
        ["generate", "--help"],
        ["demo", "--help"],
        ["eval", "--help"],
        ["sft", "--model", "no/such/dir", "--train-file", "t.jsonl"],
        ["sft", "--lr-schedular", "cosine"],
        ["grpo", "--help"],
        ["expert-iteration", "--help"],
        ["dpo", "--help"],
        ["dpo", "--model", "m", "--train-file", "p.jsonl", "--beta", "0"],
        ["grpo", "--model", "no/such/dir", "--train-file", "q.jsonl", "--reward", "gsm8k"],
        ["grpo", "--rollout-batch-size", "10", "--group-size", "4"],
    ],
)
def test_help_and_config_errors_never_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from posttrain.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'datasets') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in done.stderr, done.stderr


def test_generate_stops_at_the_chat_end_of_turn_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import posttrain.generation.decode as generation

    seen: dict[str, object] = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs)
        return [[generation.Sample("hi", [1], 1, "eos", False, 0.0)]]

    tokenizer = type(
        "ChatTok",
        (),
        {
            "eos_token_id": 7,
            "chat_template": "x",
        },
    )()
    monkeypatch.setattr(generation, "load_model_and_tokenizer", lambda *a: (None, tokenizer))
    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(
        "posttrain.data.tokenized.end_of_turn_token_ids", lambda tok: [42, tok.eos_token_id]
    )
    assert main(["generate", "--model", str(tmp_path), "--prompt", "q"]) == 0
    assert capsys.readouterr().out == "hi\n"
    assert seen["stop_token_ids"] == [42, 7]


def test_every_command_checks_flags_and_paths_before_importing_torch(tmp_path: Path) -> None:
    """eval, generate, inspect and demo took 3-5 s to report a typo: torch came first."""
    model = tmp_path / "model"
    model.mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    nowhere, missing = str(tmp_path / "nowhere"), str(tmp_path / "missing.jsonl")
    m, d = str(model), str(data)
    cases = [
        (["generate", "--model", nowhere, "--prompt", "p"], "does not exist"),
        (["generate", "--model", m, "--prompt", "p", "--max-new-tokens", "0"], "at least 1"),
        (["eval", "--model", nowhere, "--data", d, "--reward", "gsm8k"], "does not exist"),
        (["eval", "--model", m, "--data", missing, "--reward", "gsm8k"], "not found"),
        (["eval", "--model", m, "--data", d, "--reward", "gsm9k"], "unknown reward"),
        (["inspect", "--model", nowhere, "--train-file", d], "does not exist"),
        (["inspect", "--model", m, "--train-file", missing], "data file not found"),
        (["inspect", "--model", m, "--train-file", d, "--num-examples", "-1"], ">= 0"),
        (["demo", "--max-steps", "0"], "--max-steps must be at least 1"),
        # The tracker's package, missing (hidden here in case it is installed).
        (["sft", "--model", str(model), "--train-file", str(data), "--report-to", "wandb"],
         "--report-to wandb needs the wandb package, which is not installed: "
         "pip install 'posttrain[wandb]'"),
        (["sft", "--model", str(model), "--train-file", str(data), "--report-to", "tensorboard"],
         "pip install 'posttrain[tensorboard]'"),
    ]  # fmt: skip
    code = (
        "import sys\n"
        "sys.modules['wandb'] = sys.modules['tensorboard'] = None\n"
        "from posttrain.cli.main import main\n"
        f"for argv, _ in {cases!r}:\n"
        "    print(main(argv), file=sys.stderr)\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "HEAVY []", done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 * len(cases), done.stderr
    for (argv, message), error, code_line in zip(cases, lines[::2], lines[1::2], strict=True):
        assert error.startswith(f"posttrain {argv[0]}: error: ") and message in error, error
        assert code_line == "2", argv


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_reward_without_a_generation_file_is_warned_about(
    command: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib

    from posttrain.config import SFTConfig
    from posttrain.config.dpo import DPOConfig

    cli = importlib.import_module(f"posttrain.cli.{command}")
    config_class = SFTConfig if command == "sft" else DPOConfig
    (tmp_path / "m").mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = config_class(model=str(tmp_path / "m"), train_file=str(data), reward="gsm8k")
    with caplog.at_level("WARNING", logger="posttrain"):
        cli.check_paths(config)
    assert [r.getMessage() for r in caplog.records] == [
        f"posttrain {command}: --reward gsm8k is ignored without --eval-generate-file (the "
        "prompts with gold answers it would score)"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="posttrain"):
        cli.check_paths(config_class(model=str(tmp_path / "m"), train_file=str(data)))
    assert caplog.records == []
