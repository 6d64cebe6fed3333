"""`posttrain sft`: supervised fine-tuning from a YAML config and/or flags."""

from __future__ import annotations

import argparse

from posttrain.cli.common import (
    check_data_path,
    check_model_dir,
    check_tracker,
    env_rank,
    logger,
)
from posttrain.cli.training import run_training
from posttrain.config import SFTConfig, add_config_arguments, config_from_args
from posttrain.config.values import flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def check_paths(config: SFTConfig) -> None:
    """The input paths exist and the tracker is installed: checked before torch is
    imported, so a typo costs no wait. Settings that would be ignored are warned about."""
    check_model_dir(config.model)
    for name in ("train_file", "eval_file", "eval_generate_file"):
        check_data_path(getattr(config, name), flag(name))
    check_tracker(config.report_to)
    if config.reward is not None and config.eval_generate_file is None and env_rank() == 0:
        logger.warning(
            "posttrain sft: --reward %s is ignored without --eval-generate-file (the "
            "prompts with gold answers it would score)",
            config.reward,
        )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_paths(config)

    def train() -> object:
        from posttrain.sft.train import train as train_sft

        return train_sft(config)

    return run_training("sft", train)
