"""`posttrain expert-iteration`: sample, keep the correct responses, fine-tune on them."""

from __future__ import annotations

import argparse

from posttrain.cli.grpo import check_paths
from posttrain.cli.training import run_training
from posttrain.config.grpo import EI_SPEC


def add_arguments(parser: argparse.ArgumentParser) -> None:
    EI_SPEC.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = EI_SPEC.from_args(args)
    check_paths(config)

    def train() -> object:
        from posttrain.grpo.train import train_expert_iteration

        return train_expert_iteration(config)

    return run_training("expert-iteration", train)
