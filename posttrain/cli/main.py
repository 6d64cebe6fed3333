"""The `posttrain` command: one subcommand per module in `posttrain/cli/`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in posttrain.cli; each module defines `add_arguments(parser)`
# and `run(args) -> int`, and is imported only when its subcommand runs.
SUBCOMMANDS = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"posttrain.cli.{module_name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(f"posttrain.cli.{SUBCOMMANDS[args.command][0]}")
    return module.run(args)
