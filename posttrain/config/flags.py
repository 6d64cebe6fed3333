"""The command-line form of `SFTConfig`: one flag per field, over an optional YAML file."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Collection
from typing import Any, Literal

from posttrain.config.sft import (
    _TYPES,
    FIELDS,
    RENAMED,
    SFTConfig,
    _check_unknown,
    _coerce,
    _renamed,
    _resume_path,
    load_config,
)
from posttrain.config.values import flag, type_name, unwrap_optional


def _arg_type(name: str) -> typing.Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return _coerce(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = type_name(_TYPES[name])  # argparse shows this in its errors
    return convert


def add_config_arguments(
    parser: argparse.ArgumentParser, only: Collection[str] | None = None
) -> argparse.ArgumentParser:
    """Add `--config FILE` and one flag per `SFTConfig` field to `parser`.

    Flags default to "not given" (they are absent from the parsed namespace), so that
    only the flags actually passed override the YAML file. Booleans get
    `--flag/--no-flag`, Literals get choices, optional numbers accept `none`.

    `only`: the fields a command uses (and "config" for `--config`), for a command such as
    `posttrain inspect` that needs a few. Only those are listed by `--help`; the flags of
    the other fields are still accepted, hidden, so that an sft command line works with
    the command name changed, and `config_from_args(args, only=...)` ignores them.
    """
    if only is not None:
        unknown = set(only) - FIELDS.keys() - {"config"}
        if unknown:
            raise ValueError(f"add_config_arguments: not SFTConfig fields: {sorted(unknown)}")
    if only is None or "config" in only:
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help="YAML file of settings (keys as below, with underscores); flags override it "
            "(default: none)",
        )
    group = parser.add_argument_group(
        "training settings (also valid as YAML keys)"
        if only is None
        else "settings shared with posttrain sft (also valid as YAML keys)"
    )
    for name in FIELDS:
        _add_field_argument(group, name, shown=only is None or name in only)
    for old, new in RENAMED.items():
        group.add_argument(
            flag(old),
            dest=old,
            default=argparse.SUPPRESS,
            type=_arg_type(new),
            help=argparse.SUPPRESS,
        )
    return parser


def _add_field_argument(group: argparse._ArgumentGroup, name: str, shown: bool) -> None:
    f = FIELDS[name]
    base, optional = unwrap_optional(_TYPES[name])
    if f.metadata["required"]:
        default_text = "required"
    else:
        default_text = "default: " + ("none" if f.default is None else str(f.default))
    # '%' would be read as a format specifier by argparse's help formatter.
    help_text = f"{f.metadata['help']} ({default_text})".replace("%", "%%")
    kwargs: dict[str, Any] = {
        "dest": name,
        "default": argparse.SUPPRESS,
        "help": help_text if shown else argparse.SUPPRESS,
    }
    if name == "resume":
        # `--resume` alone: the latest checkpoint; `--resume PATH`: that checkpoint.
        kwargs.update(nargs="?", const="true", metavar="PATH")
        group.add_argument(
            "--no-resume",
            dest=name,
            action="store_const",
            const="false",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    elif base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) is Literal:
        kwargs["choices"] = list(typing.get_args(base))
    else:
        kwargs["type"] = _arg_type(name)
        kwargs["metavar"] = ("N" if base is int else "X" if base is float else "STR") + (
            "|none" if optional else ""
        )
    group.add_argument(flag(name), **kwargs)


def config_from_args(args: argparse.Namespace, only: Collection[str] | None = None) -> SFTConfig:
    """Resolve the config: YAML file (if `--config`) overridden by the flags given.

    `only`: the fields the command uses (as given to `add_config_arguments`); the YAML
    keys and flags of the others are ignored, so that one file serves `posttrain sft` and
    `posttrain inspect`. Unknown keys are still rejected.
    """
    values: dict[str, Any] = {}
    source = getattr(args, "config", None)
    if source:
        values = load_config(source)
        _check_unknown(values, str(source))
        values = _resume_path(_renamed(_only(values, only), str(source)))
        # Type errors in the file are reported with its name; once flags are merged
        # in, a bad value could come from either, so later errors name only the field.
        for name, value in values.items():
            try:
                values[name] = _coerce(name, value)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
    flags = {name: getattr(args, name) for name in (*FIELDS, *RENAMED) if hasattr(args, name)}
    values.update(_resume_path(_renamed(_only(flags, only))))
    return SFTConfig(**values)


def _only(values: dict[str, Any], only: Collection[str] | None) -> dict[str, Any]:
    # A deprecated key counts as its new name, so it is kept or dropped with it.
    if only is None:
        return values
    return {key: value for key, value in values.items() if RENAMED.get(key, key) in only}
