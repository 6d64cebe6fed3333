"""SFTConfig: YAML + flags precedence, unknown keys, type and range errors, --help, round trip."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from posttrain.config import (
    SFTConfig,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    config_to_dict,
    key_hint,
    load_config,
    save_config,
)

REQUIRED = {"model": "models/tiny", "train_file": "data/train.jsonl"}


def _parser() -> argparse.ArgumentParser:
    return add_config_arguments(argparse.ArgumentParser(prog="posttrain sft"))


def _resolve(argv: list[str]) -> SFTConfig:
    return config_from_args(_parser().parse_args(argv))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_spec() -> None:
    cfg = config_from_dict(REQUIRED)
    assert (cfg.micro_batch_size, cfg.grad_accum_steps, cfg.max_steps) == (4, 1, None)
    assert (cfg.lr, cfg.lr_scheduler, cfg.loss_normalization) == (2e-5, "cosine", "token")
    assert (cfg.output_dir, cfg.max_seq_len, cfg.keep_last, cfg.progress) == (
        "runs/sft",
        2048,
        2,
        True,
    )
    for f in dataclasses.fields(SFTConfig):
        assert f.metadata["help"], f"{f.name} has no help string"


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "model: from-yaml\ntrain_file: t.jsonl\nlr: 1.0e-4\nmicro_batch_size: 8\nseed: 3\n"
        "group_by_length: false\n",
    )
    cfg = _resolve(["--config", str(path), "--lr", "3e-4", "--model", "from-flag", "--resume"])
    assert cfg.model == "from-flag"  # flag beats YAML
    assert cfg.lr == 3e-4
    assert cfg.micro_batch_size == 8  # YAML beats default
    assert cfg.seed == 3
    assert cfg.group_by_length is False
    assert cfg.resume is True  # flag only
    assert cfg.grad_accum_steps == 1  # default
    # A boolean flag can switch off what the YAML switched on.
    path2 = _write(tmp_path, "model: m\ntrain_file: t\nprogress: true\n")
    assert _resolve(["--config", str(path2), "--no-progress"]).progress is False


def test_unknown_key_suggests_the_closest_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"did you mean 'micro_batch_size'\?"):
        config_from_dict({**REQUIRED, "micro_batch": 2})
    path = _write(tmp_path, "model: m\ntrain_file: t\nlearning_rat: 1.0e-4\nepoch: 2\n")
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat' in .*run\.yaml"):
        _resolve(["--config", str(path)])
    with pytest.raises(ValueError, match=r"'epoch'.*did you mean 'epochs'"):
        config_from_dict({**REQUIRED, "epoch": 2})


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("micro_batch_size", "four", r"micro_batch_size must be int"),
        ("micro_batch_size", True, r"micro_batch_size must be int, got bool"),
        ("micro_batch_size", 2.5, r"micro_batch_size must be int"),
        ("lr", [1], r"lr must be float"),
        ("lr", "nan", r"lr must be float.*finite"),
        ("append_eos", "maybe", r"append_eos must be bool"),
        ("loss_normalization", "mean", r"loss_normalization must be one of 'token', 'sequence'"),
        ("model", 42, r"model must be str"),
        ("max_seq_len", None, r"max_seq_len must be int"),
    ],
)
def test_type_errors_name_the_field(key: str, value: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        config_from_dict({**REQUIRED, key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("micro_batch_size", 0),
        ("grad_accum_steps", -1),
        ("lr", 0),
        ("epochs", 0),
        ("max_steps", 0),
        ("warmup_steps", -1),
        ("adam_beta2", 1.0),
        ("min_lr_ratio", 1.5),
        ("max_grad_norm", -0.1),
        ("keep_last", 0),
        ("seed", -1),
    ],
)
def test_range_errors_name_the_field(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{key} must"):
        config_from_dict({**REQUIRED, key: value})


def test_cross_field_checks() -> None:
    with pytest.raises(ValueError, match=r"eval_every.*no eval_file"):
        config_from_dict({**REQUIRED, "eval_every": 10})
    with pytest.raises(ValueError, match="resume and overwrite"):
        config_from_dict({**REQUIRED, "resume": True, "overwrite": True})


def test_lossless_conversions() -> None:
    # YAML 1.1 reads `2e-5` as a string; the CLI passes text; `none` clears an optional.
    cfg = config_from_dict({**REQUIRED, "lr": "2e-5", "max_steps": "1_000", "eval_file": None})
    assert cfg.lr == 2e-5 and cfg.max_steps == 1000
    cfg = config_from_dict({**REQUIRED, "epochs": 2, "max_steps": 100.0, "append_eos": "no"})
    assert cfg.epochs == 2.0 and isinstance(cfg.epochs, float)
    assert cfg.max_steps == 100 and isinstance(cfg.max_steps, int)
    assert cfg.append_eos is False
    assert _resolve(["--model", "m", "--train-file", "t", "--max-steps", "none"]).max_steps is None


def test_missing_required_fields_give_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"missing required setting\(s\) model, train_file"):
        _resolve([])
    with pytest.raises(ValueError, match=r"train_file: pass --train-file"):
        _resolve(["--model", "m"])


def test_bad_yaml_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match=r"run\.yaml: invalid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ValueError, match=r"run\.yaml: a config file must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    assert load_config(_write(tmp_path, "")) == {}
    with pytest.raises(ValueError, match=r"run\.yaml: micro_batch_size must be int"):
        _resolve(["--config", str(_write(tmp_path, "micro_batch_size: lots\n"))])


def test_bad_flag_values_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--micro-batch-size", "1.5"])
    assert "--micro-batch-size: micro_batch_size must be int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--loss-normalization", "mean"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_field_with_its_default() -> None:
    parser = _parser()
    text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
    required_flags = [
        "--config",
        "--model",
        "--train-file",
        "--eval-file",
        "--output-dir",
        "--prompt-field",
        "--response-field",
        "--max-seq-len",
        "--micro-batch-size",
        "--grad-accum-steps",
        "--max-steps",
        "--epochs",
        "--lr",
        "--loss-normalization {token,sequence}",
        "--seed",
        "--resume",
        "--save-every",
        "--eval-every",
    ]
    for flag in required_flags:
        assert flag in text, flag
    flags = {s for action in parser._actions for s in action.option_strings}
    for f in dataclasses.fields(SFTConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags
        action = next(a for a in parser._actions if flag in a.option_strings)
        if f.metadata["required"]:
            assert "(required)" in action.help
        else:
            shown = "none" if f.default is None else str(f.default)
            assert f"(default: {shown})" in action.help, f.name
    assert "--no-resume" in flags and "--no-append-eos" in flags


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {**REQUIRED, "lr": 3e-4, "max_steps": 7, "eval_file": "e.jsonl", "eval_every": 2}
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(load_config(path)) == cfg
    assert _resolve(["--config", str(path)]) == cfg
    assert config_to_dict(cfg)["max_steps"] == 7
    assert list(config_to_dict(cfg))[:2] == ["model", "train_file"]
    # A config built in code is validated like one read from YAML.
    with pytest.raises(ValueError, match="lr must be > 0"):
        dataclasses.replace(cfg, lr=-1.0)


def test_renamed_key_still_works_with_a_deprecation_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="posttrain"):
        yaml_file = _write(tmp_path, "model: m\ntrain_file: t\nlogprob_chunk_size: 64\n")
        from_yaml = _resolve(["--config", str(yaml_file)])
        from_flag = _resolve([*_required_flags(), "--logprob-chunk-size", "32"])
        from_dict = config_from_dict({**REQUIRED, "logprob_chunk_size": 16})
    assert (from_yaml.loss_chunk_size, from_flag.loss_chunk_size) == (64, 32)
    assert from_dict.loss_chunk_size == 16
    messages = [r.getMessage() for r in caplog.records]
    assert sum("'logprob_chunk_size'" in m and "deprecated" in m for m in messages) == 3
    assert all("loss_chunk_size" in m for m in messages if "deprecated" in m)
    with pytest.raises(ValueError, match="both 'logprob_chunk_size' and its new name"):
        config_from_dict({**REQUIRED, "logprob_chunk_size": 8, "loss_chunk_size": 8})
    assert "logprob" not in _parser().format_help()


def _required_flags() -> list[str]:
    return ["--model", REQUIRED["model"], "--train-file", REQUIRED["train_file"]]


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("learning_rate", r"unknown config key 'learning_rate': posttrain calls it 'lr'"),
        ("per_device_train_batch_size", r"posttrain calls it 'micro_batch_size'"),
        ("gradient_accumulation_steps", r"posttrain calls it 'grad_accum_steps'"),
        ("num_train_epochs", r"posttrain calls it 'epochs'"),
        ("max_length", r"posttrain calls it 'max_seq_len'"),
        ("max_seq_length", r"posttrain calls it 'max_seq_len'"),
        ("lr_scheduler_type", r"posttrain calls it 'lr_scheduler'"),
        ("logging_steps", r"posttrain calls it 'log_every'"),
        ("save_steps", r"posttrain calls it 'save_every'"),
        ("eval_steps", r"posttrain calls it 'eval_every'"),
        ("warmup_ratio", r"posttrain has no warmup ratio: set 'warmup_steps'"),
        ("bf16", r"posttrain sets it with 'precision': bf16"),
        ("lerning_rate", r"did you mean 'lr'\?"),  # a near miss of a Hugging Face name
    ],
)
def test_hugging_face_names_get_the_posttrain_name(key: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        config_from_dict({**REQUIRED, key: 1})


def test_hugging_face_names_in_a_yaml_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: m\ntrain_file: t\nlearning_rate: 1.0e-4\n")
    with pytest.raises(
        ValueError, match=r"'learning_rate' in .*run\.yaml: posttrain calls it 'lr'"
    ):
        _resolve(["--config", str(path)])


def test_key_hint_only_suggests_known_names() -> None:
    assert key_hint("--micro-batch", as_flag=True) == "did you mean --micro-batch-size?"
    assert key_hint("learning-rate", as_flag=True) == "posttrain calls it --lr"
    # A command without --lr gets no Hugging Face hint pointing at it.
    assert key_hint("learning_rate", known={"seed", "model"}) is None
    assert key_hint("zzz") is None


INSPECT_LIKE = {"config", "model", "train_file", "max_seq_len", "micro_batch_size"}


def _subset_parser() -> argparse.ArgumentParser:
    return add_config_arguments(argparse.ArgumentParser(prog="p"), only=INSPECT_LIKE)


def test_only_shows_a_subset_and_ignores_the_other_settings(tmp_path: Path) -> None:
    text = _subset_parser().format_help()
    assert "--max-seq-len" in text and "--micro-batch-size" in text and "--config" in text
    assert "--lr" not in text and "--save-every" not in text and "--resume" not in text
    # An sft file: keys outside the subset are ignored, even values sft would refuse.
    path = _write(
        tmp_path,
        "model: m\ntrain_file: t\nmax_seq_len: 64\nlr: -1\nsave_every: 5\neval_every: 3\n"
        "resume: true\noverwrite: true\nlogprob_chunk_size: 8\n",
    )
    args = _subset_parser().parse_args(["--config", str(path), "--lr", "5", "--save-every", "2"])
    cfg = config_from_args(args, only=INSPECT_LIKE)
    assert (cfg.max_seq_len, cfg.lr, cfg.save_every, cfg.resume) == (64, 2e-5, 0, False)
    # Unknown keys and bad values of the settings it uses are still errors.
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        config_from_args(
            _subset_parser().parse_args(["--config", str(_write(tmp_path, "learning_rate: 1\n"))]),
            only=INSPECT_LIKE,
        )
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        config_from_args(
            _subset_parser().parse_args([*_required_flags(), "--max-seq-len", "0"]),
            only=INSPECT_LIKE,
        )
    with pytest.raises(ValueError, match="not SFTConfig fields"):
        add_config_arguments(argparse.ArgumentParser(), only={"model", "mdoel"})


def test_resume_flag_forms_still_work() -> None:
    assert _resolve([*_required_flags(), "--resume"]).resume is True
    cfg = _resolve([*_required_flags(), "--resume", "runs/x/checkpoints/step-000010"])
    assert cfg.resume is True and cfg.resume_from == "runs/x/checkpoints/step-000010"
    assert _resolve([*_required_flags(), "--resume", "--no-resume"]).resume is False


# --------------------------------------------------------------------------- the one layer


def test_config_modules_import_no_private_names_from_each_other() -> None:
    """One flag/YAML layer (`config.spec`) serves every config: no module reaches into
    another's private helpers, as the SFT flags once did with five of config/sft.py's."""
    import ast

    import posttrain.config

    folder = Path(posttrain.config.__file__).parent
    private = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("posttrain"):
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_sft_config_from_python_suggests_the_posttrain_name() -> None:
    from posttrain.config import UnknownSettingError

    with pytest.raises(
        TypeError, match="SFTConfig has no setting 'learning_rate': posttrain calls it 'lr'"
    ):
        SFTConfig(**REQUIRED, learning_rate=1e-4)
    # Also a ValueError, as every other config error, so the command line reports it in one line.
    with pytest.raises(ValueError, match=r"'micro_batch': did you mean 'micro_batch_size'\?"):
        SFTConfig(**REQUIRED, micro_batch=2)
    with pytest.raises(UnknownSettingError, match="renamed 'loss_chunk_size'"):
        SFTConfig(**REQUIRED, logprob_chunk_size=8)
    # Known keywords, and dataclasses.replace, are untouched.
    assert dataclasses.replace(SFTConfig(**REQUIRED), lr=1e-3).lr == 1e-3


def test_a_new_config_reuses_the_layer_in_a_few_lines(tmp_path: Path) -> None:
    from posttrain.config import ConfigSpec

    def setting(default: object, help: str, required: bool = False) -> object:
        return dataclasses.field(default=default, metadata={"help": help, "required": required})

    @dataclasses.dataclass
    class GRPOLike:
        model: str = setting(None, "model directory", required=True)
        loss_type: Literal["grpo_clip", "no_baseline"] = setting("grpo_clip", "the loss")
        group_size: int = setting(8, "samples per prompt")
        lr: float = setting(1e-6, "learning rate")
        max_steps: int | None = setting(None, "steps")
        use_std: bool = setting(True, "normalise by std")
        stop: list[str] | None = dataclasses.field(
            default=None, metadata={"help": "stop strings", "required": False}
        )
        resume: bool = setting(False, "resume")
        resume_from: str | None = setting(None, "checkpoint")

        def __post_init__(self) -> None:
            from posttrain.config.values import prepare_fields

            prepare_fields(self)

    spec = ConfigSpec(GRPOLike, "posttrain grpo", path_flags={"resume": "resume_from"})
    parser = spec.add_arguments(argparse.ArgumentParser(prog="posttrain grpo"))
    text = " ".join(parser.format_help().split())
    assert "--model STR model directory (required)" in text
    assert "--loss-type {grpo_clip,no_baseline}" in text and "(default: 8)" in text
    path = _write(tmp_path, "model: m\ngroup_size: 4\nmax_steps: 10\nuse_std: false\n")
    argv = ["--config", str(path), "--max-steps", "none", "--stop", "a", "--stop", "b"]
    cfg = spec.from_args(parser.parse_args([*argv, "--resume", "ckpt/step-5"]))
    assert (cfg.model, cfg.group_size, cfg.max_steps, cfg.use_std) == ("m", 4, None, False)
    assert (cfg.stop, cfg.resume, cfg.resume_from) == (["a", "b"], True, "ckpt/step-5")
    with pytest.raises(
        ValueError, match=r"unknown config key 'learning_rate' in g\.yaml: posttrain calls it 'lr'"
    ):
        spec.from_dict({"model": "m", "learning_rate": 1}, "g.yaml")
    with pytest.raises(
        ValueError, match=r"did you mean 'group_size'\? \(see `posttrain grpo --help`\)"
    ):
        spec.from_dict({"model": "m", "group_sise": 1})
    with pytest.raises(ValueError, match="group_size must be int"):
        spec.from_dict({"model": "m", "group_size": "many"})
    with pytest.raises(
        TypeError, match="GRPOLike has no setting 'learning_rate': posttrain calls it 'lr'"
    ):
        GRPOLike(model="m", learning_rate=1.0)
