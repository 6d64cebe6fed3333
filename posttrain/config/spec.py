"""The one layer between a config dataclass and its YAML file and command-line flags.

Any dataclass whose fields carry `{"help": str, "required": bool}` metadata (and
optionally "metavar") gets, through a `ConfigSpec`:

- one flag per field, help from the metadata with the default (or "required"),
  `--x/--no-x` for booleans, choices for Literals, `none` for optionals, a repeatable
  flag for `list[str]`, and `--config FILE` for a YAML file;
- precedence dataclass defaults < YAML file < flags given, every value type-checked
  (lossless conversions only, `posttrain.config.values`);
- unknown keys rejected with the closest name, or the config's own name for a foreign
  one (`aliases`: Hugging Face's `learning_rate` -> `lr`), from flags, YAML, dicts and
  the dataclass's own constructor alike;
- renamed keys still accepted with a deprecation message (`renamed`);
- a boolean that also takes a path (`path_flags`: `--resume` / `--resume PATH`).

A new config needs its dataclass and one line, e.g.
`GRPO_SPEC = ConfigSpec(GRPOConfig, "posttrain grpo")`, then
`GRPO_SPEC.add_arguments(parser)` and `GRPO_SPEC.from_args(args)` in its command.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import logging
import os
import typing
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.config.values import FALSE, TRUE, coerce_value, flag, type_name, unwrap_optional

logger = logging.getLogger("posttrain")

T = typing.TypeVar("T")

# Hugging Face (TrainingArguments, TRL) name -> posttrain's: people bring these from their
# old configs, and a spelling suggestion would not find 'lr' from 'learning_rate'. Every
# config gets the hints whose posttrain name it has.
HF_NAMES: dict[str, str] = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_train_epochs": "epochs",
    "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "lr_scheduler_type": "lr_scheduler",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_last",
    "adam_epsilon": "adam_eps",
    "overwrite_output_dir": "overwrite",
    "resume_from_checkpoint": "resume",  # which takes true or a checkpoint path
    "warmup_ratio": "warmup_steps",
    "bf16": "precision",
    "fp16": "precision",
}
# Where the posttrain setting is not the same thing under another name.
HF_NOTES: dict[str, str] = {
    "warmup_ratio": "posttrain has no warmup ratio: set {}, a number of optimizer steps",
    "bf16": "posttrain sets it with {}: bf16, fp32 or auto (bf16 where supported, the default)",
    "fp16": "posttrain has no fp16: set {} to bf16, fp32 or auto",
}


class UnknownSettingError(TypeError, ValueError):
    """A config dataclass was built with a keyword it does not have. A TypeError, as
    Python raises for any unknown keyword, and a ValueError, as every other config error
    is (the command line reports those in one line)."""


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a dict (not yet validated; see `ConfigSpec.from_dict`).

    An empty file is an empty mapping; anything but a mapping with string keys at the top
    level, or invalid YAML, is a `ValueError` naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: a config file must be a mapping of settings, got {type(data).__name__}"
        )
    for key in data:
        if not isinstance(key, str):
            raise ValueError(f"{path}: config keys must be strings, got {key!r}")
    return data


def save_config_dict(config: Mapping[str, Any], path: str | os.PathLike[str], command: str) -> Path:
    """Write a config (plain values) as YAML, loadable with `posttrain COMMAND --config`,
    headed by the command it configures; written atomically."""
    path = Path(path)
    text = f"# posttrain {command} config\n" + yaml.safe_dump(
        dict(config), sort_keys=False, default_flow_style=False
    )
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def key_hint(
    key: str,
    known: Collection[str],
    *,
    as_flag: bool = False,
    aliases: Mapping[str, str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> str | None:
    """What to tell someone who wrote the unknown setting `key` (a YAML key or a flag).

    A foreign name in `aliases` (foreign -> ours) gets our name for it, worded by
    `notes[key]` when there is one (a format string with `{}` for the name); anything
    else gets the closest of `known`, where a near miss of a foreign name counts as our
    name (`lerning_rate` -> `lr`). Aliases whose target is not in `known` are ignored.
    None when nothing is close. Names are shown as flags (`--lr`) when `as_flag`, else
    as keys (`'lr'`).
    """
    show = flag if as_flag else repr
    key = key.lstrip("-").replace("-", "_").lower()
    ours = {old: new for old, new in (aliases or {}).items() if new in known}
    if key in ours:
        return (notes or {}).get(key, "posttrain calls it {}").format(show(ours[key]))
    guess = difflib.get_close_matches(key, [*known, *ours], n=1, cutoff=0.6)
    return f"did you mean {show(ours.get(guess[0], guess[0]))}?" if guess else None


@dataclass
class ConfigSpec:
    """How the config dataclass `cls` is read from YAML, flags and dicts.

    `command`: the command that takes it ("posttrain sft"), named in messages. `title`:
    the heading of its flags in `--help`. `renamed`: old key -> new key, still accepted
    with a deprecation message. `aliases` and `notes`: see `key_hint` (default: the
    Hugging Face names, `HF_NAMES`). `path_flags`:
    boolean field -> the path field that `--field PATH` (or `field: PATH` in YAML) sets,
    the boolean then being true.

    Building a spec also makes `cls(...)` itself reject an unknown keyword with the same
    hint (`UnknownSettingError`), so code gets the help the command line gets.
    """

    cls: type
    command: str = "posttrain"
    title: str = "settings (also valid as YAML keys)"
    renamed: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=lambda: HF_NAMES)
    notes: Mapping[str, str] = field(default_factory=lambda: HF_NOTES)
    path_flags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fields: dict[str, dataclasses.Field] = {
            f.name: f for f in dataclasses.fields(self.cls)
        }
        # Resolved once: with `from __future__ import annotations` they are strings.
        self.types: dict[str, Any] = typing.get_type_hints(self.cls)
        _guard_init(self)

    # ------------------------------------------------------------------ names

    def key_hint(
        self, key: str, known: Collection[str] | None = None, *, as_flag: bool = False
    ) -> str | None:
        """`key_hint` with this config's fields (or `known`) and foreign names."""
        known = self.fields.keys() if known is None else known
        return key_hint(key, known, as_flag=as_flag, aliases=self.aliases, notes=self.notes)

    def check_unknown(self, keys: Iterable[str], source: str | None = None) -> None:
        """Raise ValueError for the first key that is neither a field nor a renamed one."""
        where = f" in {source}" if source else ""
        for key in keys:
            if key in self.fields or key in self.renamed:
                continue
            hint = self.key_hint(str(key))
            raise ValueError(
                f"unknown config key {str(key)!r}{where}{f': {hint}' if hint else ''} "
                f"(see `{self.command} --help`)"
            )

    def renames_applied(self, values: Mapping[str, Any], source: str | None = None) -> dict:
        """`values` with deprecated keys moved to their new names (each said once)."""
        out = dict(values)
        for old, new in self.renamed.items():
            if old not in out:
                continue
            where = f" in {source}" if source else ""
            if new in out:
                raise ValueError(
                    f"both {old!r} and its new name {new!r} are set{where}; keep {new!r}"
                )
            logger.warning("posttrain: %r%s is deprecated, use %r (%s)", old, where, new, flag(new))
            out[new] = out.pop(old)
        return out

    def paths_applied(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """`resume: PATH` (YAML or `--resume PATH`) -> resume_from=PATH, resume=True."""
        out = dict(values)
        for name, path_field in self.path_flags.items():
            value = out.get(name)
            if isinstance(value, str) and value.lower() not in TRUE | FALSE:
                out.update({name: True, path_field: value})
        return out

    def _normalised(self, values: Mapping[str, Any], source: str | None = None) -> dict:
        return self.paths_applied(self.renames_applied(values, source))

    # ------------------------------------------------------------------ dicts

    def from_dict(self, values: Mapping[str, Any], source: str | None = None) -> Any:
        """Build and validate the config from field name -> value.

        Unknown keys are rejected with the closest valid name, values are type-checked
        (and converted where lossless), and the dataclass's own checks run; every error
        is a `ValueError` naming the field, and `source` (a file name) when given.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"config must be a mapping, got {type(values).__name__}")
        self.check_unknown(values, source)
        try:
            return self.cls(**self._normalised(values, source))
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}" if source else str(exc)) from None

    # ------------------------------------------------------------------ flags

    def add_arguments(
        self, parser: argparse.ArgumentParser, only: Collection[str] | None = None
    ) -> argparse.ArgumentParser:
        """Add `--config FILE` and one flag per field to `parser`.

        Flags default to "not given" (absent from the parsed namespace), so that only the
        flags actually passed override the YAML file. `only`: the fields a command uses
        (and "config" for `--config`), for a command that needs a few; only those are
        listed by `--help`, the other flags are still accepted, hidden, and
        `from_args(args, only=...)` ignores them.
        """
        if only is not None:
            unknown = set(only) - self.fields.keys() - {"config"}
            if unknown:
                raise ValueError(
                    f"add_config_arguments: not {self.cls.__name__} fields: {sorted(unknown)}"
                )
        if only is None or "config" in only:
            parser.add_argument(
                "--config",
                metavar="FILE",
                default=None,
                help="YAML file of settings (keys as below, with underscores); flags "
                "override it (default: none)",
            )
        title = self.title if only is None else f"settings shared with {self.command}"
        group = parser.add_argument_group(title)
        for name in self.fields:
            self._add_field(group, name, shown=only is None or name in only)
        for old, new in self.renamed.items():
            group.add_argument(
                flag(old),
                dest=old,
                default=argparse.SUPPRESS,
                type=self._converter(new, self.types[new]),
                help=argparse.SUPPRESS,
            )
        return parser

    def _converter(self, name: str, tp: Any) -> typing.Callable[[str], Any]:
        def convert(text: str) -> Any:
            try:
                return coerce_value(name, tp, text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        convert.__name__ = type_name(tp)  # argparse shows this in its errors
        return convert

    def _add_field(self, group: argparse._ArgumentGroup, name: str, shown: bool) -> None:
        f = self.fields[name]
        base, optional = unwrap_optional(self.types[name])
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
        if name in self.path_flags:
            # `--resume` alone: true; `--resume PATH`: that path (see paths_applied).
            kwargs.update(nargs="?", const="true", metavar="PATH")
            group.add_argument(
                flag(f"no_{name}"),
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
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            kwargs.update(action="append", type=self._converter(name, item), metavar="STR")
        else:
            kwargs["type"] = self._converter(name, self.types[name])
            kwargs["metavar"] = f.metadata.get("metavar") or (
                {int: "N", float: "X"}.get(base, "STR") + ("|none" if optional else "")
            )
        group.add_argument(flag(name), **kwargs)

    def from_args(self, args: argparse.Namespace, only: Collection[str] | None = None) -> Any:
        """Resolve the config: the YAML file given with `--config` (if any), overridden by
        the flags given. `only`: as given to `add_arguments`; the YAML keys and flags of
        the other fields are ignored (unknown keys are still rejected).

        A type error in the file names the file; once flags are merged in, a bad value
        could come from either, so later errors name only the field.
        """
        values: dict[str, Any] = {}
        source = getattr(args, "config", None)
        if source:
            values = load_config(source)
            self.check_unknown(values, str(source))
            values = self._normalised(self._only(values, only), str(source))
            for name, value in values.items():
                try:
                    values[name] = coerce_value(name, self.types[name], value)
                except ValueError as exc:
                    raise ValueError(f"{source}: {exc}") from None
        names = (*self.fields, *self.renamed)
        given = {name: getattr(args, name) for name in names if hasattr(args, name)}
        values.update(self._normalised(self._only(given, only)))
        return self.cls(**values)

    def _only(self, values: dict[str, Any], only: Collection[str] | None) -> dict[str, Any]:
        # A deprecated key counts as its new name, so it is kept or dropped with it.
        if only is None:
            return values
        return {key: v for key, v in values.items() if self.renamed.get(key, key) in only}


def _guard_init(spec: ConfigSpec) -> None:
    """Make `spec.cls(...)` refuse an unknown keyword with `spec`'s hint (once per class)."""
    cls = spec.cls
    init = cls.__init__
    if getattr(init, "_posttrain_guarded", False):
        return

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key in spec.fields:
                continue
            if key in spec.renamed:
                hint = f"it was renamed {spec.renamed[key]!r}"
            else:
                hint = spec.key_hint(key) or f"see `{spec.command} --help` for the settings"
            raise UnknownSettingError(f"{cls.__name__} has no setting {key!r}: {hint}")
        init(self, *args, **kwargs)

    __init__._posttrain_guarded = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


# Generic forms for a dataclass without a spec of its own (kept for `posttrain.config.eval`'s
# callers): each builds the default spec of `cls`.


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str = "settings (also valid as YAML keys)"
) -> argparse.ArgumentParser:
    """`ConfigSpec(cls, title=title).add_arguments(parser)`."""
    return ConfigSpec(cls, title=title).add_arguments(parser)


def dataclass_from_dict(
    cls: type[T], values: Mapping[str, Any], source: str | None = None, command: str = "posttrain"
) -> T:
    """`ConfigSpec(cls, command).from_dict(values, source)`."""
    return ConfigSpec(cls, command).from_dict(values, source)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, command: str = "posttrain") -> T:
    """`ConfigSpec(cls, command).from_args(args)`."""
    return ConfigSpec(cls, command).from_args(args)
