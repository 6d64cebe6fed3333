"""`DPOConfig`: the settings of `posttrain dpo` (preference optimisation), on top of the
shared `TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config.spec import ConfigSpec
from posttrain.config.train import REQUIRED, TrainConfig, need
from posttrain.config.train import setting as _f


@dataclass
class DPOConfig(TrainConfig):
    """Every setting of a DPO run (see `posttrain dpo --help`)."""

    train_file: str = _f(
        REQUIRED,
        "preference pairs: prompt, chosen, rejected (JSONL, JSON or Parquet)",
        required=True,
    )
    output_dir: str = _f("runs/dpo", "where checkpoints, metrics and the final model go")
    lr: float = _f(1e-6, "peak learning rate")
    eval_file: str | None = _f(None, "held-out pairs, same format as train_file")
    # --- pairs
    prompt_field: str = _f("prompt", "record field holding the prompt")
    chosen_field: str = _f("chosen", "record field holding the preferred response")
    rejected_field: str = _f("rejected", "record field holding the other response")
    max_seq_len: int = _f(2048, "maximum tokens per sequence")
    truncation: Literal["truncate", "drop"] = _f(
        "truncate", "what to do with sequences longer than max_seq_len (a pair goes whole)"
    )
    append_eos: bool = _f(True, "append the EOS token after each response")
    # --- batch
    group_by_length: bool = _f(True, "batch pairs of similar length to reduce padding")
    micro_batch_size: int = _f(4, "pairs per forward/backward pass (per device)")
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    epochs: float = _f(1.0, "passes over the pairs when max_steps is not set")
    # --- the objective
    beta: float = _f(0.1, "DPO beta: how far the policy may move from the reference")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = _f(
        "sigmoid", "sigmoid (DPO), ipo (on length-normalised log-probs) or hinge"
    )
    label_smoothing: float = _f(0.0, "sigmoid: the assumed share of flipped labels (cDPO)")
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end, when eval_file is set)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompt_field", "chosen_field", "rejected_field"):
            need(self, bool(getattr(self, name)), name, "must not be empty")
        for name in ("max_seq_len", "micro_batch_size", "grad_accum_steps"):
            need(self, getattr(self, name) >= 1, name, "must be >= 1")
        need(self, self.epochs > 0, "epochs", "must be > 0")
        need(
            self,
            self.beta > 0,
            "beta",
            "must be > 0 (beta 0 would not tie the policy to the reference)",
        )
        need(self, 0.0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        need(self, self.eval_every >= 0, "eval_every", "must be >= 0")
        if self.eval_every > 0 and self.eval_file is None:
            raise ValueError(f"eval_every is {self.eval_every} but no eval_file is set")


# How DPOConfig reads from YAML and flags; `--resume PATH` sets resume_from.
DPO_SPEC = ConfigSpec(
    DPOConfig,
    "posttrain dpo",
    title="DPO settings (also valid as YAML keys)",
    path_flags={"resume": "resume_from"},
)
