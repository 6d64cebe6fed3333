"""`posttrain sft`: supervised fine-tuning from a YAML config and/or flags."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from posttrain.cli.common import (
    check_data_path,
    check_model_dir,
    check_tracker,
    env_rank,
    logger,
)
from posttrain.config import SFTConfig, add_config_arguments, config_from_args
from posttrain.config.values import flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments plus --resume."""
    args = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite")]
    return shlex.join(["posttrain", "sft", *args, "--resume"])


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
    from posttrain.sft.train import TrainingInterrupted, train

    try:
        result = train(config)
    except TrainingInterrupted as stop:
        if env_rank() == 0:
            name = signal.Signals(stop.signum).name
            argv = sys.argv[sys.argv.index("sft") + 1 :] if "sft" in sys.argv else []
            print(
                f"posttrain sft: stopped by {name} after step {stop.step}; checkpoint "
                f"{stop.checkpoint}\n  resume with: {resume_command(argv)}",
                file=sys.stderr,
            )
        return 128 + stop.signum
    if env_rank() != 0:
        return 0  # under torchrun, rank 0 speaks for the run
    if result.already_finished:
        print(
            f"{result.final_model_dir.parent} is already finished ({result.steps} steps): "
            f"nothing to do\n  model:   {result.final_model_dir}"
        )
        return 0
    print(
        f"done: {result.steps} steps in {result.train_seconds:.1f}s, final loss "
        f"{result.final_loss:.4f}\n  model:   {result.final_model_dir}\n"
        f"  metrics: {result.metrics_path}"
        + (f"\n  plot:    {result.plot_path}" if result.plot_path else "")
    )
    return 0
