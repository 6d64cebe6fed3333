"""The settings the engine runs on, whatever the method: plain values, no config class.

A method's entry point builds `RunSettings.of(config)` from its own config dataclass,
which has (at least) these fields under these names; the engine reads nothing else of
it. The method's whole config is saved with every checkpoint as a plain dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Settings that say how to run, not what to train: never reported as changed on resume.
HOW_TO_RUN = (
    "resume",
    "resume_from",
    "resume_with_changes",
    "overwrite",
    "progress",
    "num_threads",
    "output_dir",
)
# Settings of the engine whose change on resume makes the run differ from an
# uninterrupted one in what it trains: refused unless resume_with_changes. A method adds
# its own (data, objective) through `Method.breaks_exact_resume`.
ENGINE_BREAKS_EXACT_RESUME = (
    "model",
    "seed",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)


@dataclass(frozen=True)
class RunSettings:
    """Where the run lives, the model, the optimizer and schedule, precision and
    distribution, checkpoints and logging. Each setting means what the flag of the same
    name says (`posttrain sft --help`); the defaults serve a method used from Python."""

    model: str
    output_dir: str
    seed: int = 0
    # --- optimizer and schedule
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    # --- speed, memory, distribution
    precision: str = "auto"
    strategy: str = "ddp"
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = None
    head_matmul_dtype: str = "fp32"
    num_threads: int | None = None
    # --- LoRA
    lora_r: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    merge_lora: bool = True
    # --- run directory, checkpoints, resume, logging
    overwrite: bool = False
    resume: bool = False
    resume_from: str | None = None
    resume_with_changes: bool = False
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1
    progress: bool = True
    report_to: str = "none"

    def __post_init__(self) -> None:
        if self.resume_from is not None:
            object.__setattr__(self, "resume", True)  # a checkpoint path implies resuming

    @classmethod
    def of(cls, config: Any) -> RunSettings:
        """The engine's settings from a method's config (its fields of these names)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @property
    def lora(self) -> bool:
        return self.lora_r > 0
