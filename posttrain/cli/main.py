"""The `posttrain` command: one subcommand per module in `posttrain/cli/`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from posttrain.cli.common import env_rank

# subcommand -> (module in posttrain.cli, help); each module defines
# `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("sft", "supervised fine-tuning of a causal LM on prompt/response data"),
    "inspect": ("inspect_data", "show the data as posttrain sft sees it: tokens, masks, stats"),
    "demo": ("demo", "a complete fine-tuning run on a CPU in minutes, no download: start here"),
    "generate": ("generate", "greedy completion of a prompt by a saved model, stopping at EOS"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"posttrain.cli.{module_name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # Under torchrun only rank 0 talks; the others log warnings and errors.
    quiet = env_rank() != 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    module = importlib.import_module(f"posttrain.cli.{SUBCOMMANDS[args.command][0]}")
    try:
        return module.run(args)
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
