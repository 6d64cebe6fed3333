"""The `posttrain` command: one subcommand per module in `posttrain/cli/`."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Sequence

from posttrain.cli.common import env_rank
from posttrain.config import key_hint

# subcommand -> (module in posttrain.cli, help); each module defines
# `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("sft", "supervised fine-tuning of a causal LM on prompt/response data"),
    "grpo": ("grpo", "RL with verifiable rewards (GRPO): sample, score, reinforce"),
    "dpo": ("dpo", "preference optimisation (DPO) on prompt/chosen/rejected pairs"),
    "expert-iteration": (
        "expert_iteration",
        "sample answers, keep the correct ones, fine-tune on them, repeat",
    ),
    "inspect": ("inspect_data", "show the data as posttrain sft sees it: tokens, masks, stats"),
    "demo": ("demo", "a complete fine-tuning run on a CPU in minutes, no download: start here"),
    "generate": ("generate", "greedy completion of a prompt by a saved model, stopping at EOS"),
    "eval": ("eval", "does the model get the answers right? generate, score with a reward"),
}

# argparse takes `-1` and `-0.5` for values but `-1e-4` (and `-inf`) for an option, so
# `--lr -1e-4` failed with "expected one argument" instead of reaching the range check.
_NEGATIVE_NUMBER = re.compile(r"-(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?|-(inf|infinity|nan)", re.I)


def _version() -> str:
    # From the installed metadata: the package's __init__ sits above the CLI's layer.
    try:
        return importlib.metadata.version("posttrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """`--flag -1e-4` -> `--flag=-1e-4`, the spelling argparse always reads as a value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":  # everything after it is positional
            out.extend(argv[i:])
            break
        value = argv[i + 1] if i + 1 < len(argv) else None
        if (
            token.startswith("--")
            and "=" not in token
            and value is not None
            and _NEGATIVE_NUMBER.fullmatch(value)
        ):
            out.append(f"{token}={value}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def unrecognized_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """argparse's "unrecognized arguments" error, with the flag each one probably meant."""
    known = {
        option[2:].replace("-", "_")
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--")
    }
    flags = [token.split("=", 1)[0] for token in extras if token.startswith("--")]
    hints = [(flag, hint) for flag in flags if (hint := key_hint(flag, known, as_flag=True))]
    message = f"unrecognized arguments: {' '.join(extras)}"
    if len(flags) == 1 and hints:
        return f"{message}; {hints[0][1]}"
    return message + "".join(f"; {flag}: {hint}" for flag, hint in hints)


def build_parser(
    argv: Sequence[str] = (),
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `posttrain` parser and its subcommand parsers, by name.

    Only the subcommand named in `argv` gets its arguments (its module imported): the
    top-level help lists the others from `SUBCOMMANDS` alone, so it imports nothing heavy.
    """
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"posttrain {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((token for token in argv if token in SUBCOMMANDS), None)
    parsers = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # No abbreviations: `--micro-batch 4` would silently mean --micro-batch-size, and
        # change meaning the day another flag starting with `--micro-batch` is added.
        parsers[name] = sub.add_parser(
            name, help=help_text, description=help_text, allow_abbrev=False
        )
        if name == chosen:
            importlib.import_module(f"posttrain.cli.{module_name}").add_arguments(parsers[name])
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        command_parser = parsers.get(getattr(args, "command", None) or "", parser)
        command_parser.error(unrecognized_message(command_parser, extras))
    # Under torchrun only rank 0 talks; the others log warnings and errors.
    quiet = env_rank() != 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    module = importlib.import_module(f"posttrain.cli.{SUBCOMMANDS[args.command][0]}")
    try:
        return module.run(args)
    except KeyboardInterrupt:
        # Ctrl-C outside a training loop (loading, tokenizing, generating): nothing to save.
        print(f"posttrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # User errors (bad data, config, paths, a diverged run) are reported in one
        # line; anything else is a bug and keeps its traceback. POSTTRAIN_TRACEBACK=1
        # shows where a user error came from.
        user_error = isinstance(exc, (ValueError, FileNotFoundError)) or getattr(
            exc, "user_facing", False
        )
        if not user_error or os.environ.get("POSTTRAIN_TRACEBACK"):
            raise
        print(f"posttrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
