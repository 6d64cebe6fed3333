"""`SFTConfig`, the settings of a run: types, checks, and their YAML form.

Every value, from a YAML file, a flag (`posttrain.config.flags`) or code, goes through the
same type checks and range checks; unknown keys are rejected with the name to use.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.config.spec import HF_NAMES as HF_NAMES  # re-exported: posttrain.config
from posttrain.config.spec import ConfigSpec, save_config_dict
from posttrain.config.spec import load_config as load_config
from posttrain.config.train import TrainConfig, need
from posttrain.config.train import setting as _f
from posttrain.data.records import DataFormat


@dataclass
class SFTConfig(TrainConfig):
    """Every setting of a supervised fine-tuning run (see `posttrain sft --help`): the
    shared ones of `TrainConfig` and the data, batch and objective settings below."""

    output_dir: str = _f("runs/sft", "where checkpoints, metrics and the final model go")

    # --- data
    eval_file: str | None = _f(None, "evaluation data, same format as train_file")
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
    group_by_length: bool = _f(True, "batch examples of similar length to reduce padding")
    # --- batch
    micro_batch_size: int = _f(4, "examples per forward/backward pass (per device)")
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    epochs: float = _f(1.0, "passes over the training data when max_steps is not set")
    # --- objective
    loss_normalization: Literal["token", "sequence"] = _f(
        "token", "average the loss over all response tokens, or per sequence then over sequences"
    )
    # --- held-out loss evaluation
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end, when eval_file is set)")
    eval_limit: int | None = _f(
        None, "evaluate on the first N examples of eval_file only (none: all of them)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
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
    """Range and cross-field checks of the SFT settings; each error names the field."""
    for name in ("prompt_field", "response_field", "messages_field"):
        need(cfg, bool(getattr(cfg, name)), name, "must not be empty")
    for name in ("max_seq_len", "micro_batch_size", "grad_accum_steps"):
        need(cfg, getattr(cfg, name) >= 1, name, "must be >= 1")
    need(cfg, cfg.eval_limit is None or cfg.eval_limit >= 1, "eval_limit", "must be >= 1 (or none)")
    need(cfg, cfg.eval_every >= 0, "eval_every", "must be >= 0")
    need(cfg, cfg.epochs > 0, "epochs", "must be > 0")
    if cfg.eval_every > 0 and cfg.eval_file is None:
        raise ValueError(f"eval_every is {cfg.eval_every} but no eval_file is set")


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
