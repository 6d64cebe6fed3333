"""`SFTConfig`, the settings of a run: types, checks, and their YAML form.

Every value, from a YAML file, a flag (`posttrain.config.flags`) or code, goes through the
same type checks and range checks; unknown keys are rejected with the name to use.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.config.spec import HF_NAMES as HF_NAMES  # re-exported: posttrain.config
from posttrain.config.spec import ConfigSpec, save_config_dict
from posttrain.config.spec import load_config as load_config
from posttrain.config.values import prepare_fields
from posttrain.data.records import DataFormat

# Marks the two fields that have no default, so that the dataclass can keep the
# declared field order (model and train_file first) and still report a clean
# "missing" error instead of a TypeError from __init__.
_REQUIRED: Any = None


def _f(default: Any, help: str, required: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "required": required})


@dataclass
class SFTConfig:
    """Every setting of a supervised fine-tuning run (see `posttrain sft --help`)."""

    # --- data and model
    model: str = _f(_REQUIRED, "path to a Hugging Face model directory", required=True)
    train_file: str = _f(_REQUIRED, "training data (JSONL, JSON or Parquet)", required=True)
    eval_file: str | None = _f(None, "evaluation data, same format as train_file")
    output_dir: str = _f("runs/sft", "where checkpoints, metrics and the final model go")
    prompt_field: str = _f("prompt", "record field holding the prompt")
    response_field: str = _f(
        "response", "record field holding the response ('completion' is also recognised)"
    )
    messages_field: str = _f("messages", "record field holding a chat (list of messages)")
    max_seq_len: int = _f(2048, "maximum tokens per example")
    truncation: Literal["truncate", "drop"] = _f(
        "truncate", "what to do with examples longer than max_seq_len"
    )
    append_eos: bool = _f(True, "append the EOS token after each response")
    # --- batch and schedule
    micro_batch_size: int = _f(4, "examples per forward/backward pass (per device)")
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int | None = _f(None, "optimizer steps to run (none: derived from epochs)")
    epochs: float = _f(1.0, "passes over the training data when max_steps is not set")
    lr: float = _f(2e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f(
        "cosine", "learning-rate decay after warmup"
    )
    warmup_steps: int = _f(0, "linear warmup steps from 0 to lr")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables clipping)")
    loss_normalization: Literal["token", "sequence"] = _f(
        "token", "average the loss over all response tokens, or per sequence then over sequences"
    )
    seed: int = _f(0, "random seed (data order, initialisation of anything random)")
    # --- speed and memory
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "auto: bf16 autocast where the device supports it, else fp32"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations to save memory")
    loss_chunk_size: int | None = _f(
        None, "tokens per chunk of the LM-head/loss computation (none: from a 320 MiB budget)"
    )
    head_matmul_dtype: Literal["fp32", "bf16"] = _f("fp32", "dtype of the LM-head matmul")
    group_by_length: bool = _f(True, "batch examples of similar length to reduce padding")
    # --- LoRA (needs `pip install 'posttrain[lora]'`)
    lora_r: int = _f(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: float | None = _f(None, "LoRA scaling alpha (none: 2 x lora_r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA path")
    lora_target_modules: str = _f(
        "all-linear", "layers that get adapters: all-linear, or names such as q_proj,v_proj"
    )
    merge_lora: bool = _f(True, "also save a merged full model in final/")
    # --- logging, evaluation, checkpoints
    log_every: int = _f(1, "log metrics every N optimizer steps")
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end, when eval_file is set)")
    eval_limit: int | None = _f(
        None, "evaluate on the first N examples of eval_file only (none: all of them)"
    )
    eval_generate_file: str | None = _f(
        None, "prompts with gold answers: generate, score with --reward, log accuracy"
    )
    eval_generate_every: int = _f(
        0, "generation evaluation every N steps (0: only at the end, when its file is set)"
    )
    eval_generate_limit: int | None = _f(
        256, "generate for the first N prompts of eval_generate_file (none: all)"
    )
    eval_max_new_tokens: int = _f(512, "new tokens per answer in generation evaluation")
    reward: str | None = _f(
        None,
        "reward for generation evaluation: gsm8k, math, r1_zero, mmlu, exact, or "
        "path/file.py:function / package.module:function",
    )
    eval_prompt_field: str | None = _f(
        None, "question field of eval_generate_file (none: 'prompt', else 'question')"
    )
    eval_answer_field: str | None = _f(
        None,
        "gold-answer field of eval_generate_file (none: 'answer', else 'response', else "
        "'completion')",
    )
    eval_prompt_template: str | None = _f(
        None, "template for eval prompts: r1_zero, question_only or a file with {question}"
    )
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _f(2, "number of most recent checkpoints to keep")
    resume: bool = _f(
        False,
        "resume from the latest complete checkpoint in output_dir (--resume PATH: from that "
        "checkpoint directory)",
    )
    resume_from: str | None = _f(None, "checkpoint directory to resume from (implies resume)")
    resume_with_changes: bool = _f(
        False,
        "resume even though the model, data, batch geometry or seed differ from the "
        "checkpoint's config (the run will not match an uninterrupted one)",
    )
    report_to: Literal["none", "wandb", "tensorboard"] = _f(
        "none", "also send metrics to this tracker"
    )
    strategy: Literal["ddp", "fsdp"] = _f("ddp", "multi-GPU strategy under torchrun")
    num_threads: int | None = _f(
        None,
        "CPU threads for torch (none: torch's default, one per core; lower it on a busy "
        "machine or for a tiny model, see the README)",
    )
    overwrite: bool = _f(False, "allow writing into a non-empty output_dir")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        # Checked here rather than only in config_from_dict so that a config built in
        # code (or by dataclasses.replace) is held to the same rules as one from YAML.
        prepare_fields(self)
        _validate(self)

    def data_format(self) -> DataFormat:
        """The data settings, as the plain values the data path takes."""
        return DataFormat(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataFormat)})


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(SFTConfig)}
# Old key -> new key: still accepted, with a deprecation message.
RENAMED = {"logprob_chunk_size": "loss_chunk_size"}
REQUIRED_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["required"])
# How SFTConfig reads from YAML and flags; `--resume PATH` sets resume_from.
SPEC = ConfigSpec(
    SFTConfig,
    "posttrain sft",
    title="training settings (also valid as YAML keys)",
    renamed=RENAMED,
    path_flags={"resume": "resume_from"},
)


def key_hint(
    key: str, known: Collection[str] = FIELDS.keys(), *, as_flag: bool = False
) -> str | None:
    """What to tell someone who wrote the unknown setting `key` (a YAML key or a flag).

    A Hugging Face name gets the posttrain name for it; anything else the closest of
    `known`, where a near miss of a Hugging Face name counts as its posttrain name
    (`lerning_rate` -> `lr`). None when nothing is close. Names are shown as flags
    (`--lr`) when `as_flag`, else as keys (`'lr'`).
    """
    return SPEC.key_hint(key, known, as_flag=as_flag)


# --------------------------------------------------------------------------- validation


def _validate(cfg: SFTConfig) -> None:
    """Range and cross-field checks; each error names the field."""

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{name} {what}, got {getattr(cfg, name)!r}")

    for name in ("model", "train_file", "output_dir"):
        need(bool(getattr(cfg, name).strip()), name, "must not be empty")
    for name in ("prompt_field", "response_field", "messages_field"):
        need(bool(getattr(cfg, name)), name, "must not be empty")
    for name in ("max_seq_len", "micro_batch_size", "grad_accum_steps", "log_every", "keep_last"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    for name in (
        "max_steps",
        "loss_chunk_size",
        "num_threads",
        "eval_limit",
        "eval_generate_limit",
    ):
        value = getattr(cfg, name)
        need(value is None or value >= 1, name, "must be >= 1 (or none)")
    for name in (
        "warmup_steps",
        "eval_every",
        "eval_generate_every",
        "save_every",
        "weight_decay",
        "max_grad_norm",
        "lora_r",
    ):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.epochs > 0, "epochs", "must be > 0")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.adam_eps > 0, "adam_eps", "must be > 0")
    for name in ("adam_beta1", "adam_beta2"):
        need(0.0 <= getattr(cfg, name) < 1.0, name, "must be in [0, 1)")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
    # numpy seeds must fit in 32 bits, and the same seed seeds every generator.
    need(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32)")
    if cfg.eval_every > 0 and cfg.eval_file is None:
        raise ValueError(f"eval_every is {cfg.eval_every} but no eval_file is set")
    need(cfg.eval_max_new_tokens >= 1, "eval_max_new_tokens", "must be >= 1")
    if cfg.eval_generate_every > 0 and cfg.eval_generate_file is None:
        raise ValueError(
            f"eval_generate_every is {cfg.eval_generate_every} but no eval_generate_file is set"
        )
    if cfg.eval_generate_file is not None and not cfg.reward:
        raise ValueError(
            "eval_generate_file is set but no reward: pass --reward gsm8k (or math, r1_zero, "
            "mmlu, exact, path/file.py:function)"
        )
    need(0.0 <= cfg.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
    need(cfg.lora_alpha is None or cfg.lora_alpha > 0, "lora_alpha", "must be > 0 (or none)")
    need(bool(cfg.lora_target_modules.strip()), "lora_target_modules", "must not be empty")
    if cfg.resume_from is not None:
        cfg.resume = True
    if cfg.resume and cfg.overwrite:
        raise ValueError(
            "resume and overwrite are mutually exclusive: overwrite would discard the "
            "checkpoints that resume needs"
        )


# --------------------------------------------------------------------------- dict / YAML


def config_from_dict(d: typing.Mapping[str, Any], source: str | None = None) -> SFTConfig:
    """Build and validate an `SFTConfig` from a mapping of field name -> value.

    Unknown keys are rejected with the closest valid name, values are type-checked
    (and converted where lossless), and ranges are validated; every error is a
    `ValueError` naming the field. `source` (a file name) is added to messages.
    """
    return SPEC.from_dict(d, source)


def config_to_dict(cfg: SFTConfig) -> dict[str, Any]:
    """The config as a plain dict, in field order (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: SFTConfig, path: str | os.PathLike[str]) -> Path:
    """Write the config as YAML (loadable with `--config`); written atomically."""
    return save_config_dict(config_to_dict(cfg), path, "sft")
