"""`EvalConfig`, the settings of `posttrain eval`.

Its flags and YAML form come from the layer every config uses,
`posttrain.config.spec.ConfigSpec` (`EVAL_SPEC`): one flag per field, `--config FILE`,
precedence defaults < YAML < flags, every value type-checked, unknown keys rejected with
the closest valid name; `list[str]` fields take a YAML list or a repeated flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.config.spec import (
    ConfigSpec,
    add_dataclass_arguments,
    dataclass_from_args,
    dataclass_from_dict,
)
from posttrain.config.values import prepare_fields

__all__ = [
    "EVAL_SPEC",
    "EvalConfig",
    "add_dataclass_arguments",
    "dataclass_from_args",
    "dataclass_from_dict",
]


def _f(default: Any, help: str, required: bool = False, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "required": required, "metavar": metavar})


# --------------------------------------------------------------------------- EvalConfig

_REQUIRED: Any = None


@dataclass
class EvalConfig:
    """Every setting of `posttrain eval` (see `posttrain eval --help`)."""

    model: str = _f(
        _REQUIRED, "Hugging Face model directory, e.g. RUN/final", required=True, metavar="DIR"
    )
    data: str = _f(
        _REQUIRED,
        "questions with gold answers: JSONL, JSON, Parquet or a datasets save_to_disk dir",
        required=True,
        metavar="FILE",
    )
    reward: str = _f(
        _REQUIRED,
        "how answers are scored: gsm8k, math, r1_zero, mmlu, exact, or your own as "
        "path/file.py:function or package.module:function",
        required=True,
        metavar="NAME",
    )
    prompt_field: str | None = _f(
        None, "field holding the question (none: 'prompt', else 'question')", metavar="NAME"
    )
    answer_field: str | None = _f(
        None,
        "field holding the gold answer (none: 'answer', else 'response', else 'completion')",
        metavar="NAME",
    )
    prompt_template: str = _f(
        "question_only",
        "r1_zero, question_only, or a text file with {question}",
        metavar="NAME|FILE",
    )
    chat: bool = _f(False, "send each prompt as a user message through the chat template")
    n: int = _f(1, "samples per prompt (more than 1 needs temperature > 0; gives pass@n)")
    temperature: float = _f(0.0, "sampling temperature (0: greedy)")
    top_p: float = _f(1.0, "nucleus sampling probability mass")
    max_new_tokens: int = _f(512, "new tokens per answer at most")
    limit: int | None = _f(None, "evaluate the first N rows only (none: all)")
    stop: list[str] | None = field(
        default=None,
        metadata={
            "help": "stop string, repeatable (none: the template's, '</answer>' for r1_zero)",
            "required": False,
        },
    )
    seed: int = _f(0, "sampling seed")
    batch_size: int = _f(64, "prompts per generation batch")
    output_dir: str = _f("runs/eval", "where summary.json and generations.jsonl go", metavar="DIR")
    device: str = _f("auto", "cpu, cuda, cuda:1, ... (auto: CUDA if available)")
    overwrite: bool = _f(False, "replace the summary and generations of an earlier eval")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        prepare_fields(self)
        _validate(self)


def _validate(cfg: EvalConfig) -> None:
    """Range and cross-field checks; each error names the field."""

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{name} {what}, got {getattr(cfg, name)!r}")

    for name in ("model", "data", "reward", "output_dir"):
        need(bool(getattr(cfg, name).strip()), name, "must not be empty")
    for name in ("prompt_field", "answer_field"):
        value = getattr(cfg, name)
        need(value is None or bool(value.strip()), name, "must not be empty (or none)")
    for name in ("n", "max_new_tokens", "batch_size"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    need(cfg.limit is None or cfg.limit >= 1, "limit", "must be >= 1 (or none)")
    need(cfg.temperature >= 0, "temperature", "must be >= 0")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.seed >= 0, "seed", "must be >= 0")
    need(all(text for text in cfg.stop or ()), "stop", "must hold non-empty strings")
    if cfg.n > 1 and cfg.temperature == 0:
        raise ValueError(
            f"n is {cfg.n} but temperature is 0: greedy samples would all be identical; "
            "pass --temperature 1.0 (or --n 1)"
        )


EVAL_SPEC = ConfigSpec(
    EvalConfig, "posttrain eval", "evaluation settings (also valid as YAML keys)"
)
