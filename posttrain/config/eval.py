"""`EvalConfig`, the settings of `posttrain eval`, and the dataclass <-> YAML / flags layer
it is built with.

The layer is the one `SFTConfig` uses (`schema`, `args`), for any dataclass whose fields
carry `{"help", "required"}` metadata: one flag per field, `--config FILE` for YAML,
precedence defaults < YAML < flags, every value type-checked (lossless conversions only),
unknown keys rejected with the closest valid name. It adds list fields (`list[str]`: a
YAML list, or a repeated flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.config.sft import key_hint, load_config
from posttrain.config.values import coerce_value, flag, prepare_fields, type_name, unwrap_optional

T = typing.TypeVar("T")


def _f(default: Any, help: str, required: bool = False, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "required": required, "metavar": metavar})


# --------------------------------------------------------------------------- the layer


def _converter(name: str, tp: Any) -> typing.Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return coerce_value(name, tp, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = type_name(tp)  # argparse shows this in its errors
    return convert


def _shown(value: Any) -> str:
    return (
        "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str = "settings (also valid as YAML keys)"
) -> argparse.ArgumentParser:
    """Add `--config FILE` and one flag per field of the dataclass `cls` to `parser`.

    Flags are absent from the namespace unless given, so that only those override the
    YAML file. Booleans get `--flag/--no-flag`, Literals choices, lists a repeatable flag.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML file of settings (keys as below, with underscores); flags override it",
    )
    group = parser.add_argument_group(title)
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, optional = unwrap_optional(types[f.name])
        default = "required" if f.metadata["required"] else f"default: {_shown(f.default)}"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            # '%' would be read as a format specifier by argparse's help formatter.
            "help": f"{f.metadata['help']} ({default})".replace("%", "%%"),
        }
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = list(typing.get_args(base))
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            kwargs.update(action="append", type=_converter(f.name, item), metavar="STR")
        else:
            kwargs["type"] = _converter(f.name, types[f.name])
            kwargs["metavar"] = f.metadata.get("metavar") or (
                {int: "N", float: "X"}.get(base, "STR") + ("|none" * optional)
            )
        group.add_argument(flag(f.name), **kwargs)
    return parser


def _check_unknown(cls: type, keys: typing.Iterable[str], source: str | None, command: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in known:
            hint = key_hint(str(key), known)
            where = f" in {source}" if source else ""
            raise ValueError(
                f"unknown config key {str(key)!r}{where}{f': {hint}' if hint else ''} "
                f"(see `{command} --help`)"
            )


def dataclass_from_dict(
    cls: type[T], values: Mapping[str, Any], source: str | None = None, command: str = "posttrain"
) -> T:
    """Build and validate `cls` from field name -> value; errors name `source` (a file)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"config must be a mapping, got {type(values).__name__}")
    _check_unknown(cls, values, source, command)
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}" if source else str(exc)) from None


def dataclass_from_args(cls: type[T], args: argparse.Namespace, command: str = "posttrain") -> T:
    """Resolve `cls` from the YAML file given with `--config` (if any) and the flags given.

    A type error in the file names the file; once flags are merged in, a bad value
    could come from either, so later errors name only the field.
    """
    values: dict[str, Any] = {}
    source = getattr(args, "config", None)
    types = typing.get_type_hints(cls)
    if source:
        values = load_config(source)
        _check_unknown(cls, values, str(source), command)
        for name, value in values.items():
            try:
                values[name] = coerce_value(name, types[name], value)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
    values.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    )
    return cls(**values)


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
    prompt_field: str = _f(
        "prompt",
        "field holding the question ('question' is used when left at 'prompt' and a "
        "row has no 'prompt')",
    )
    answer_field: str = _f(
        "answer",
        "field holding the gold answer ('response' is used when left at 'answer' and "
        "a row has no 'answer')",
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

    for name in ("model", "data", "reward", "output_dir", "prompt_field", "answer_field"):
        need(bool(getattr(cfg, name).strip()), name, "must not be empty")
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
