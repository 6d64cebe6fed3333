"""The command-line form of `SFTConfig`: one flag per field, over an optional YAML file.

The flags come from the generic layer, `posttrain.config.spec.ConfigSpec`, through
`SFTConfig`'s spec (`posttrain.config.sft.SPEC`).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection

from posttrain.config.sft import SPEC, SFTConfig


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
    return SPEC.add_arguments(parser, only)


def config_from_args(args: argparse.Namespace, only: Collection[str] | None = None) -> SFTConfig:
    """Resolve the config: YAML file (if `--config`) overridden by the flags given.

    `only`: the fields the command uses (as given to `add_config_arguments`); the YAML
    keys and flags of the others are ignored, so that one file serves `posttrain sft` and
    `posttrain inspect`. Unknown keys are still rejected.
    """
    return SPEC.from_args(args, only)
