"""`posttrain dpo`: preference optimisation (DPO) from a YAML config and/or flags."""

from __future__ import annotations

import argparse

from posttrain.cli.common import check_run_inputs
from posttrain.cli.training import run_training
from posttrain.config.dpo import DPO_SPEC, DPOConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    DPO_SPEC.add_arguments(parser)


def check_paths(config: DPOConfig) -> None:
    """The input paths exist and the tracker is installed, before torch is imported; a
    reward without prompts to score is warned about."""
    check_run_inputs("dpo", config)


def run(args: argparse.Namespace) -> int:
    config = DPO_SPEC.from_args(args)
    check_paths(config)

    def train() -> object:
        from posttrain.dpo.train import train_dpo

        return train_dpo(config)

    return run_training("dpo", train)
