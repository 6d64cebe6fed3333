"""Field values of the config dataclasses: type names for messages, and the coercion that
YAML values and flag strings go through (lossless conversions only, clear errors)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

TRUE = {"true", "yes", "on", "1"}
FALSE = {"false", "no", "off", "0"}
NONE = {"none", "null", "~"}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    """How a field type reads in messages: `int | None`, `'a' | 'b'`, `list[str]`."""
    base, optional = unwrap_optional(tp)
    if typing.get_origin(base) is Literal:
        name = " | ".join(repr(a) for a in typing.get_args(base))
    elif typing.get_origin(base) is list:
        name = f"list[{type_name(typing.get_args(base)[0])}]"
    else:
        name = base.__name__
    return f"{name} | None" if optional else name


def _number(name: str, tp: Any, value: Any, base: type) -> Any:
    def fail(reason: str = "") -> ValueError:
        return ValueError(
            f"{name} must be {type_name(tp)}, got {type(value).__name__} {value!r}{reason}"
        )

    # Bools are never numbers: `n: true` is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail()
    number: int | float = value  # type: ignore[assignment]
    if isinstance(value, str):
        text = value.replace("_", "")
        try:
            # int() first: float() would round integers past 2**53.
            number = int(text) if base is int else float(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise fail() from None
    if base is int:
        if isinstance(number, float) and not number.is_integer():
            raise fail()
        return int(number)
    if not math.isfinite(number):
        raise fail(" (must be finite)")
    return float(number)


def coerce_value(name: str, tp: Any, value: Any) -> Any:
    """Check `value` against field type `tp`, converting the lossless cases.

    Strings are accepted for numbers and booleans (flags are text, and YAML 1.1 reads
    `1e-3` as a string); `none` / `null` is None for an optional field; a single string
    is a one-item list. Raises ValueError naming the field.
    """
    base, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in NONE):
        if optional:
            return None
        raise ValueError(f"{name} must be {type_name(tp)}, got {type(value).__name__} {value!r}")
    if typing.get_origin(base) is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{name} must be {type_name(tp)}, got {type(value).__name__}")
        (item_type,) = typing.get_args(base)
        return [coerce_value(f"{name}[{i}]", item_type, v) for i, v in enumerate(items)]
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ValueError(
                f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE | FALSE:
            return value.lower() in TRUE
        raise ValueError(f"{name} must be {type_name(tp)}, got {type(value).__name__} {value!r}")
    if base in (int, float):
        return _number(name, tp, value, base)
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} must be {type_name(tp)}, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported config field type for {name}: {tp}")  # a bug in the class


def flag(name: str) -> str:
    """The command-line flag of field `name`: `micro_batch_size` -> `--micro-batch-size`."""
    return "--" + name.replace("_", "-")


def prepare_fields(obj: Any) -> None:
    """For a config's `__post_init__`: refuse missing required fields, coerce the rest."""
    types = typing.get_type_hints(type(obj))
    fields = dataclasses.fields(obj)
    missing = [
        f.name for f in fields if f.metadata.get("required") and getattr(obj, f.name) is None
    ]
    if missing:
        flags = ", ".join(flag(name) for name in missing)
        raise ValueError(
            f"missing required setting(s) {', '.join(missing)}: pass {flags} or set them in "
            "the YAML file given with --config"
        )
    for f in fields:
        setattr(obj, f.name, coerce_value(f.name, types[f.name], getattr(obj, f.name)))
