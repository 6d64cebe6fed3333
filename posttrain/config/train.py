"""`TrainConfig`: the settings every training command shares (model, data file,
optimizer and schedule, precision, LoRA, generation evaluation, checkpoints, logging).

A command's config (`SFTConfig`, `GRPOConfig`) subclasses it and adds its own settings;
a subclass redeclares a shared field to give it another default or help. The engine
takes these shared values as `RunSettings.of(config)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.config.values import prepare_fields

# Marks the fields that have no default, so that a config can keep its declared field
# order (model and train_file first) and still report a clean "missing" error instead
# of a TypeError from __init__.
REQUIRED: Any = None


def setting(default: Any, help: str, required: bool = False) -> Any:
    """A config field: its default and the help text its flag shows."""
    return field(default=default, metadata={"help": help, "required": required})


_f = setting


@dataclass
class TrainConfig:
    """The settings every training command shares (see `posttrain sft --help`)."""

    # --- model, data, output
    model: str = _f(REQUIRED, "path to a Hugging Face model directory", required=True)
    train_file: str = _f(REQUIRED, "training data (JSONL, JSON or Parquet)", required=True)
    output_dir: str = _f("runs/train", "where checkpoints, metrics and the final model go")
    # --- optimizer and schedule
    max_steps: int | None = _f(None, "optimizer steps to run (none: derived from epochs)")
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
        # Checked here rather than only when read from YAML so that a config built in
        # code (or by dataclasses.replace) is held to the same rules.
        prepare_fields(self)
        validate_train_config(self)


def need(cfg: Any, ok: bool, name: str, what: str) -> None:
    """Raise `name what, got VALUE` unless `ok`."""
    if not ok:
        raise ValueError(f"{name} {what}, got {getattr(cfg, name)!r}")


def validate_train_config(cfg: TrainConfig) -> None:
    """Range and cross-field checks of the shared settings; each error names the field."""
    for name in ("model", "train_file", "output_dir"):
        need(cfg, bool(getattr(cfg, name).strip()), name, "must not be empty")
    for name in ("log_every", "keep_last", "eval_max_new_tokens"):
        need(cfg, getattr(cfg, name) >= 1, name, "must be >= 1")
    for name in ("max_steps", "loss_chunk_size", "num_threads", "eval_generate_limit"):
        value = getattr(cfg, name)
        need(cfg, value is None or value >= 1, name, "must be >= 1 (or none)")
    for name in (
        "warmup_steps",
        "eval_generate_every",
        "save_every",
        "weight_decay",
        "max_grad_norm",
        "lora_r",
    ):
        need(cfg, getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg, cfg.lr > 0, "lr", "must be > 0")
    need(cfg, cfg.adam_eps > 0, "adam_eps", "must be > 0")
    for name in ("adam_beta1", "adam_beta2"):
        need(cfg, 0.0 <= getattr(cfg, name) < 1.0, name, "must be in [0, 1)")
    need(cfg, 0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
    # numpy seeds must fit in 32 bits, and the same seed seeds every generator.
    need(cfg, 0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32)")
    if cfg.eval_generate_every > 0 and cfg.eval_generate_file is None:
        raise ValueError(
            f"eval_generate_every is {cfg.eval_generate_every} but no eval_generate_file is set"
        )
    if cfg.eval_generate_file is not None and not cfg.reward:
        raise ValueError(
            "eval_generate_file is set but no reward: pass --reward gsm8k (or math, r1_zero, "
            "mmlu, exact, path/file.py:function)"
        )
    need(cfg, 0.0 <= cfg.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
    need(cfg, cfg.lora_alpha is None or cfg.lora_alpha > 0, "lora_alpha", "must be > 0 (or none)")
    need(cfg, bool(cfg.lora_target_modules.strip()), "lora_target_modules", "must not be empty")
    if cfg.resume_from is not None:
        cfg.resume = True
    if cfg.resume and cfg.overwrite:
        raise ValueError(
            "resume and overwrite are mutually exclusive: overwrite would discard the "
            "checkpoints that resume needs"
        )
