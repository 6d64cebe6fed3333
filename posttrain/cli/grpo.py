"""`posttrain grpo`: RL with verifiable rewards (GRPO) from a YAML config and/or flags."""

from __future__ import annotations

import argparse

from posttrain.cli.common import check_run_inputs
from posttrain.cli.training import run_training
from posttrain.config.grpo import GRPO_SPEC, GRPOConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    GRPO_SPEC.add_arguments(parser)


def check_paths(config: GRPOConfig) -> None:
    """The input paths exist and the tracker is installed, before torch is imported."""
    check_run_inputs("grpo", config, ("train_file", "eval_generate_file"), reward_trains=True)


def run(args: argparse.Namespace) -> int:
    config = GRPO_SPEC.from_args(args)
    check_paths(config)

    def train() -> object:
        from posttrain.grpo.train import train_grpo

        return train_grpo(config)

    return run_training("grpo", train)
