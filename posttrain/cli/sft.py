"""`posttrain sft`: supervised fine-tuning from a YAML config and/or flags."""

from __future__ import annotations

import argparse

from posttrain.cli.common import env_rank
from posttrain.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from posttrain.training import train

    result = train(config_from_args(args))
    if env_rank() != 0:
        return 0  # under torchrun, rank 0 speaks for the run
    print(
        f"done: {result.steps} steps in {result.train_seconds:.1f}s, final loss "
        f"{result.final_loss:.4f}\n  model:   {result.final_model_dir}\n"
        f"  metrics: {result.metrics_path}"
        + (f"\n  plot:    {result.plot_path}" if result.plot_path else "")
    )
    return 0
