"""mkdocs hooks (mkdocs.yml `hooks:`): reference tables generated from the code at build time.

A page asks for a table with an HTML comment on a line of its own (a page read unbuilt,
on GitHub, shows nothing there):

- `<!-- posttrain:settings COMMAND -->`: the settings of `posttrain COMMAND`. For a
  training command (its config builds on `TrainConfig`): the settings it adds or gives
  another default or help; `<!-- posttrain:settings COMMAND all -->`: all of them.
- `<!-- posttrain:settings train -->`: the settings every training command shares.
- `<!-- posttrain:metrics -->`: what metrics.jsonl is, then the keys of every method;
  `<!-- posttrain:metrics METHOD -->`: the keys one method logs (METHOD: its command).

Settings come from the parser each command builds (`posttrain.cli.main.build_parser`): the
flags `--help` shows, spelled as `--help` spells them, hidden ones left out, and for a
config field its YAML key, type, default and help from the dataclass and its
`ConfigSpec`. Metrics keys come from their declarations: `ENGINE_METRICS`
(`posttrain/engine/metrics.py`), each method's `metrics` and the `metrics` of its
`hook_types`. An unknown placeholder fails the build.

The metrics tables, the markdown helpers and `PlaceholderError` are in docs/hooks_metrics.py,
beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# mkdocs loads this file by path; its sibling module in docs/ is found the same way.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from hooks_metrics import PlaceholderError, cell, code, heading_id, metrics_markdown, table
    from hooks_metrics import methods as methods  # re-exported: tests call hooks.methods()
finally:
    sys.path.pop(0)

PLACEHOLDER = re.compile(r"^<!--\s*posttrain:(\w[\w-]*)((?:\s+[\w-]+)*)\s*-->[ \t]*$", re.M)
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^`\n]*?)\s*$")
SECTION = re.compile(r"^\s*# --- (.+?)\s*$")
FIELD_LINE = re.compile(r"^    (\w+)\s*:")
DEFAULT_IN_HELP = re.compile(r"\s*\((?:default: (.*)|(required))\)\s*$", re.S)
COMMAND_LINE = "Command line only"
OTHER = "Other settings"  # a field with no `# --- section` comment above it
# Where the shared training settings are (`<!-- posttrain:settings train -->`), under a
# heading with this anchor: the training commands' tables link there.
SETTINGS_PAGE = "reference/settings.md"
SHARED_ANCHOR = "shared-training-settings"


# --------------------------------------------------------------------------- the hook


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """mkdocs: replace every placeholder of the page with its table."""

    def replace(match: re.Match[str]) -> str:
        try:
            return render(match.group(1), match.group(2).split(), page.file.src_uri)
        except PlaceholderError as exc:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{page.file.src_uri}: {match.group(0)}: {exc}") from exc

    # Not inside fenced code: a page may show the placeholders themselves.
    parts = []
    for text, is_code in fenced_split(markdown):
        parts.append(text if is_code else PLACEHOLDER.sub(replace, text))
    return "".join(parts)


def fenced_split(markdown: str) -> list[tuple[str, bool]]:
    """The markdown in consecutive pieces, each (text, inside a fenced code block)."""
    pieces: list[tuple[str, bool]] = []
    fence: str | None = None
    for line in markdown.splitlines(keepends=True):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            pieces.append((line, True))
            continue
        if fence is not None and match and match.group(1).startswith(fence) and not match.group(2):
            fence = None
            pieces.append((line, True))
            continue
        if pieces and pieces[-1][1] == (fence is not None):
            pieces[-1] = (pieces[-1][0] + line, pieces[-1][1])
        else:
            pieces.append((line, fence is not None))
    return pieces


def render(kind: str, args: list[str], page: str = SETTINGS_PAGE) -> str:
    """The markdown a placeholder `<!-- posttrain:KIND ARGS -->` stands for on `page` (its
    path in docs/, which links are relative to)."""
    if kind == "settings" and len(args) == 1:
        return settings_markdown(args[0], page=page)
    if kind == "settings" and len(args) == 2 and args[1] == "all":
        return settings_markdown(args[0], every=True, page=page)
    if kind == "metrics" and len(args) <= 1:
        return metrics_markdown(args[0] if args else None)
    raise PlaceholderError(
        "expected posttrain:settings COMMAND [all], posttrain:settings train, or "
        "posttrain:metrics [METHOD]"
    )


# --------------------------------------------------------------------------- settings


@dataclass
class Setting:
    """One row of a settings table."""

    key: str | None  # the YAML key; None: a flag only
    flags: str  # as `--help` shows it: `--lr X`, `--chat, --no-chat`
    type: str
    default: str
    help: str
    section: str


@dataclass
class Command:
    """A subcommand's parser, and the config spec its flags come from (if any)."""

    name: str
    parser: argparse.ArgumentParser
    spec: Any  # posttrain.config.spec.ConfigSpec | None

    @property
    def training(self) -> bool:
        """A training command: its own config, built on `TrainConfig`."""
        from posttrain.config.train import TrainConfig

        return (
            self.spec is not None
            and self.spec.command == f"posttrain {self.name}"
            and issubclass(self.spec.cls, TrainConfig)
        )

    def visible(self) -> Iterator[tuple[argparse._ArgumentGroup, argparse.Action]]:
        """The actions `--help` lists (not -h, not --version), by group."""
        for group in self.parser._action_groups:
            for action in group._group_actions:
                if action.help == argparse.SUPPRESS or isinstance(
                    action, (argparse._HelpAction, argparse._VersionAction)
                ):
                    continue
                yield group, action

    def hidden_fields(self) -> list[str]:
        """Config fields whose flags are accepted but not listed (`only=` commands)."""
        shown = {a.dest for _, a in self.visible()}
        return [name for name in self.spec.fields if name not in shown] if self.spec else []


@contextlib.contextmanager
def _recording_specs(specs: list[Any]) -> Iterator[None]:
    """Note every `ConfigSpec` whose `add_arguments` runs meanwhile."""
    from posttrain.config.spec import ConfigSpec

    original = ConfigSpec.add_arguments

    def add_arguments(self: Any, parser: Any, only: Any = None) -> Any:
        specs.append(self)
        return original(self, parser, only)

    ConfigSpec.add_arguments = add_arguments  # type: ignore[method-assign]
    try:
        yield
    finally:
        ConfigSpec.add_arguments = original  # type: ignore[method-assign]


@functools.cache
def command(name: str) -> Command:
    """The parser `posttrain NAME` builds, as `posttrain.cli.main` builds it."""
    from posttrain.cli.main import SUBCOMMANDS, build_parser

    if name not in SUBCOMMANDS:
        raise PlaceholderError(f"no command {name!r}; the commands: {', '.join(SUBCOMMANDS)}")
    specs: list[Any] = []
    with _recording_specs(specs):
        _, parsers = build_parser([name])
    if len(specs) > 1:
        raise PlaceholderError(f"posttrain {name} takes {len(specs)} configs; one expected")
    return Command(name, parsers[name], specs[0] if specs else None)


def commands() -> list[Command]:
    """Every subcommand, in `posttrain --help` order."""
    from posttrain.cli.main import SUBCOMMANDS

    return [command(name) for name in SUBCOMMANDS]


@functools.cache
def sections(cls: type) -> dict[str, str]:
    """Field -> the `# --- section` comment above it in the class that declares it; a
    field redeclared without one keeps its parent's section."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        own = set(inspect.get_annotations(klass))
        current = None
        for line in inspect.getsource(klass).splitlines():
            if match := SECTION.match(line):
                current = match.group(1)
            elif (match := FIELD_LINE.match(line)) and match.group(1) in own and current:
                found[match.group(1)] = current[0].upper() + current[1:]
    return found


def value_text(value: Any) -> str:
    """A default as it is written in YAML or on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def field_setting(
    cmd: Command, action: argparse.Action, cls: type | None = None, section: str | None = None
) -> Setting:
    """The row of a config field: its flag from the parser, the rest from the dataclass
    (`cls`, default the command's config)."""
    from posttrain.config.values import type_name

    spec = cmd.spec
    cls = cls or spec.cls
    field = {f.name: f for f in dataclasses.fields(cls)}[action.dest]
    required = field.metadata["required"]
    return Setting(
        key=field.name,
        flags=cmd.parser._get_formatter()._format_action_invocation(action),
        type=type_name(_types(cls)[field.name]),
        default="required" if required else value_text(field.default),
        help=field.metadata["help"],
        section=section or sections(cls).get(field.name) or OTHER,
    )


@functools.cache
def _types(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def flag_setting(cmd: Command, action: argparse.Action) -> Setting:
    """The row of a flag that is no config field: all from the parser."""
    formatter = cmd.parser._get_formatter()
    text = formatter._expand_help(action) if action.help else ""
    default = "—"
    if match := DEFAULT_IN_HELP.search(text):
        text = text[: match.start()]
        default = "required" if match.group(2) else match.group(1)
    elif action.required:
        default = "required"
    elif action.nargs == 0:
        default = "off"
    elif action.default not in (None, argparse.SUPPRESS):
        default = value_text(action.default)
    if action.nargs == 0:
        kind = "bool"
    elif action.choices:
        kind = " | ".join(repr(c) for c in action.choices)
    else:
        kind = getattr(action.type, "__name__", "str")
    return Setting(
        key=None,
        flags=formatter._format_action_invocation(action),
        type=kind,
        default=default,
        help=text,
        section=COMMAND_LINE if cmd.spec is not None else "Flags",
    )


def command_settings(cmd: Command) -> list[Setting]:
    """Every row of the command's `--help`, in its order, config fields by section."""
    rows = []
    for _, action in cmd.visible():
        if cmd.spec is not None and action.dest in cmd.spec.fields:
            rows.append(field_setting(cmd, action))
        else:
            rows.append(flag_setting(cmd, action))
    if all(s.section in (OTHER, COMMAND_LINE) for s in rows):  # a config without sections
        for s in rows:
            s.section = "Settings" if s.section == OTHER else s.section
    # Sections in order of first appearance (fields without one last); within one, --help's.
    order = [*dict.fromkeys(s.section for s in rows if s.section != OTHER), OTHER]
    return sorted(rows, key=lambda s: order.index(s.section))


def shared_fields() -> dict[str, dataclasses.Field]:
    from posttrain.config.train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def changes_shared(cmd: Command, name: str) -> bool:
    """Whether the command's config adds field `name` or redeclares it otherwise."""
    from posttrain.config.train import TrainConfig

    shared = shared_fields()
    if name not in shared:
        return True
    mine = cmd.spec.fields[name]
    return (
        mine.default != shared[name].default
        or mine.metadata != shared[name].metadata
        or cmd.spec.types[name] != _types(TrainConfig)[name]
    )


def default_cell(default: str) -> str:
    """A value as code; "required", "—" and a sentence as text."""
    plain = default in ("—", "required") or " " in default
    return cell(default) if plain else code(default)


def settings_table(rows: list[Setting], with_key: bool) -> str:
    header = ["Setting", "Flag", "Type", "Default", "Description"]
    cells = [
        [
            code(s.key) if s.key else "—",
            code(s.flags),
            code(s.type),
            default_cell(s.default),
            cell(s.help),
        ]
        for s in rows
    ]
    if not with_key:
        header, cells = header[1:], [row[1:] for row in cells]
    return table(header, cells)


def grouped(prefix: str, rows: list[Setting], with_key: bool) -> str:
    """One table per section, each under an h3 (anchor `PREFIX-SECTION`) when there are
    several."""
    by_section: dict[str, list[Setting]] = {}
    for s in rows:
        by_section.setdefault(s.section, []).append(s)
    if len(by_section) == 1:
        return settings_table(rows, with_key)
    parts = []
    for title, members in by_section.items():
        anchor = heading_id(prefix, title.split(" (")[0])
        parts.append(f"### {title} {{#{anchor}}}")
        parts.append(settings_table(members, with_key))
    return "\n\n".join(parts)


def settings_markdown(name: str, every: bool = False, page: str = SETTINGS_PAGE) -> str:
    """The settings of `posttrain NAME` (or `train`: the shared training settings), for
    `page` (its path in docs/)."""
    if name == "train":
        return shared_settings_markdown()
    cmd = command(name)
    rows = command_settings(cmd)
    notes = []
    if cmd.training and not every:
        rows = [s for s in rows if s.key is None or changes_shared(cmd, s.key)]
        redeclared = [s.key for s in rows if s.key in shared_fields()]
        link = posixpath.relpath(SETTINGS_PAGE, posixpath.dirname(page) or ".")
        link = "" if page == SETTINGS_PAGE else link
        notes.append(
            f"`posttrain {name}` takes the [shared training settings]({link}#{SHARED_ANCHOR}) "
            "and the ones below"
            + (
                f", among them {', '.join(f'`{k}`' for k in redeclared)} with a default or "
                "help of its own."
                if redeclared
                else "."
            )
        )
    if cmd.spec is not None and cmd.spec.command != f"posttrain {name}" and cmd.hidden_fields():
        notes.append(
            f"`posttrain {name}` also accepts every other setting of `{cmd.spec.command}` "
            "(flags and YAML keys, not listed by `--help`) and ignores them, so one config "
            "file serves both."
        )
    if cmd.spec is not None and cmd.spec.renamed:
        old = ", ".join(f"`{a}` (now `{b}`)" for a, b in cmd.spec.renamed.items())
        notes.append(f"Old names still accepted, with a deprecation warning: {old}.")
    body = grouped(name, rows, with_key=cmd.spec is not None)
    return "\n\n".join([*notes, body]) + "\n"


def shared_settings_markdown() -> str:
    """TrainConfig's settings, with the flags of the first training command."""
    from posttrain.config.train import TrainConfig

    training = [c for c in commands() if c.training]
    if not training:
        raise PlaceholderError("no training command has a TrainConfig config")
    cmd = training[0]
    shared = shared_fields()
    rows = [
        field_setting(cmd, action, TrainConfig)
        for _, action in cmd.visible()
        if action.dest in shared
    ]
    names = ", ".join(f"`posttrain {c.name}`" for c in training)
    intro = (
        f"Taken by {names}; a command that gives one of them another default or help "
        "lists it again in its own table."
    )
    return intro + "\n\n" + grouped("shared", rows, with_key=True) + "\n"
