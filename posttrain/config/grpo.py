"""`GRPOConfig`: the settings of `posttrain grpo` (RL with verifiable rewards) and of
`posttrain expert-iteration`, on top of the shared `TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config.spec import ConfigSpec
from posttrain.config.train import REQUIRED, TrainConfig, need
from posttrain.config.train import setting as _f

LOSS_TYPES = ("no_baseline", "reinforce_with_baseline", "grpo_clip")
LENGTH_NORMALIZATIONS = ("sequence", "constant", "token")


@dataclass
class GRPOConfig(TrainConfig):
    """Every setting of a GRPO run (see `posttrain grpo --help`)."""

    train_file: str = _f(
        REQUIRED, "questions with gold answers (JSONL, JSON or Parquet)", required=True
    )
    output_dir: str = _f("runs/grpo", "where checkpoints, metrics and the final model go")
    max_steps: int | None = _f(100, "rollout batches to sample and train on (steps)")
    lr: float = _f(1e-5, "peak learning rate")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    reward: str | None = _f(
        REQUIRED,
        "reward of a response: gsm8k, math, r1_zero, mmlu, exact, or path/file.py:function "
        "/ package.module:function (also scores --eval-generate-file)",
        required=True,
    )
    # --- questions
    prompt_field: str | None = _f(None, "question field (none: 'prompt', else 'question')")
    answer_field: str | None = _f(
        None, "gold-answer field (none: 'answer', else 'response', else 'completion')"
    )
    prompt_template: str = _f(
        "question_only", "prompt template: r1_zero, question_only or a file with {question}"
    )
    chat: bool = _f(False, "render prompts with the tokenizer's chat template")
    # --- rollouts
    rollout_batch_size: int = _f(256, "responses sampled per step (questions x group_size)")
    group_size: int = _f(8, "responses per question; advantages compare within a group")
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    top_p: float = _f(1.0, "nucleus sampling of the rollouts")
    max_new_tokens: int = _f(512, "new tokens per response")
    generation_batch_size: int = _f(256, "responses generated together (a multiple of group_size)")
    # --- the update
    train_batch_size: int = _f(256, "rollouts per optimizer step (rollout_batch_size / N)")
    micro_batch_size: int = _f(8, "rollouts per forward/backward pass (per device)")
    epochs_per_rollout_batch: int = _f(1, "passes over each rollout batch (>1: off-policy)")
    loss_type: Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"] = _f(
        "reinforce_with_baseline", "policy-gradient loss"
    )
    std_normalization: bool = _f(True, "divide advantages by the group's reward std")
    advantage_eps: float = _f(1e-6, "added to the group std before dividing")
    cliprange: float = _f(0.2, "grpo_clip: ratios outside [1 - c, 1 + c] are clipped")
    length_normalization: Literal["sequence", "constant", "token"] = _f(
        "sequence",
        "sequence: each response's token mean, averaged (GRPO); constant: token sums over "
        "max_new_tokens (Dr. GRPO); token: sum over every response token of the step (DAPO)",
    )
    beta: float = _f(0.0, "weight of the KL penalty to the starting model (0: no reference)")
    kl_estimator: Literal["k1", "k2", "k3"] = _f("k3", "per-token KL estimator")

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_grpo_config(self)


def validate_grpo_config(cfg: GRPOConfig) -> None:
    """The RL settings' ranges and divisibility (the world size is checked at start)."""
    for name in (
        "rollout_batch_size",
        "train_batch_size",
        "micro_batch_size",
        "epochs_per_rollout_batch",
        "max_new_tokens",
        "generation_batch_size",
    ):
        need(cfg, getattr(cfg, name) >= 1, name, "must be >= 1")
    need(cfg, cfg.group_size >= 2, "group_size", "must be >= 2 (advantages compare a group)")
    need(cfg, cfg.max_steps is not None, "max_steps", "must be set (rollout batches to run)")
    if cfg.rollout_batch_size % cfg.group_size:
        raise ValueError(
            f"rollout_batch_size {cfg.rollout_batch_size} is not a multiple of group_size "
            f"{cfg.group_size}: each question gets group_size responses"
        )
    if cfg.generation_batch_size % cfg.group_size:
        raise ValueError(
            f"generation_batch_size {cfg.generation_batch_size} is not a multiple of "
            f"group_size {cfg.group_size}: a question's group is generated together"
        )
    if cfg.rollout_batch_size % cfg.train_batch_size:
        raise ValueError(
            f"rollout_batch_size {cfg.rollout_batch_size} is not a multiple of "
            f"train_batch_size {cfg.train_batch_size}: each rollout batch must split into "
            "whole optimizer steps"
        )
    if cfg.train_batch_size % cfg.micro_batch_size:
        raise ValueError(
            f"train_batch_size {cfg.train_batch_size} is not a multiple of micro_batch_size "
            f"{cfg.micro_batch_size} (x the number of ranks)"
        )
    need(cfg, 0.0 < cfg.cliprange < 1.0, "cliprange", "must be in (0, 1)")
    need(cfg, cfg.beta >= 0.0, "beta", "must be >= 0")
    need(cfg, cfg.temperature > 0.0, "temperature", "must be > 0 (rollouts are sampled)")
    need(cfg, 0.0 < cfg.top_p <= 1.0, "top_p", "must be in (0, 1]")
    need(cfg, cfg.advantage_eps >= 0.0, "advantage_eps", "must be >= 0")


def check_world_size(cfg: GRPOConfig, world_size: int) -> None:
    """train_batch_size splits into micro-batches on every rank: one line if not."""
    per_rank = cfg.micro_batch_size * world_size
    if cfg.train_batch_size % per_rank:
        raise ValueError(
            f"train_batch_size {cfg.train_batch_size} is not a multiple of micro_batch_size "
            f"x ranks ({cfg.micro_batch_size} x {world_size} = {per_rank})"
        )


@dataclass
class ExpertIterationConfig(GRPOConfig):
    """Every setting of an expert-iteration run (see `posttrain expert-iteration --help`):
    GRPO's rollout settings (its loss settings go unused) and the fine-tuning passes."""

    output_dir: str = _f(
        "runs/expert-iteration", "where checkpoints, metrics and the final model go"
    )
    train_batch_size: int = _f(256, "kept responses per optimizer step (the last may be fewer)")
    sft_epochs: int = _f(1, "fine-tuning passes over each step's kept responses")

    def __post_init__(self) -> None:
        super().__post_init__()
        need(self, self.sft_epochs >= 1, "sft_epochs", "must be >= 1")


# How GRPOConfig reads from YAML and flags; `--resume PATH` sets resume_from.
GRPO_SPEC = ConfigSpec(
    GRPOConfig,
    "posttrain grpo",
    title="GRPO settings (also valid as YAML keys)",
    path_flags={"resume": "resume_from"},
)
EI_SPEC = ConfigSpec(
    ExpertIterationConfig,
    "posttrain expert-iteration",
    title="expert-iteration settings (also valid as YAML keys)",
    path_flags={"resume": "resume_from"},
)
