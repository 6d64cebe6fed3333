"""`posttrain sft`: supervised fine-tuning from a YAML config and/or flags."""

from __future__ import annotations

import argparse

from posttrain.cli.common import check_run_inputs
from posttrain.cli.training import run_training
from posttrain.config import SFTConfig, add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def check_paths(config: SFTConfig) -> None:
    """The input paths exist and the tracker is installed: checked before torch is
    imported, so a typo costs no wait. Settings that would be ignored are warned about."""
    check_run_inputs("sft", config)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_paths(config)

    def train() -> object:
        from posttrain.sft.train import train as train_sft

        return train_sft(config)

    return run_training("sft", train)
