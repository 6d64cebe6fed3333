"""What the training subcommands (`sft`, `grpo`, ...) share: run the training, turn a
SIGINT/SIGTERM stop into one line with the command that resumes it, and report."""

from __future__ import annotations

import shlex
import signal
import sys
from collections.abc import Callable
from typing import Any

from posttrain.cli.common import env_rank


def resume_command(command: str, argv: list[str]) -> str:
    """The command line that continues this run: the same arguments plus --resume."""
    args = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite")]
    return shlex.join(["posttrain", command, *args, "--resume"])


def run_training(command: str, train: Callable[[], Any]) -> int:
    """Run `train()` (which returns a TrainResult) and report it; the exit status."""
    from posttrain.engine.loop import TrainingInterrupted

    try:
        result = train()
    except TrainingInterrupted as stop:
        if env_rank() == 0:
            name = signal.Signals(stop.signum).name
            argv = sys.argv[sys.argv.index(command) + 1 :] if command in sys.argv else []
            print(
                f"posttrain {command}: stopped by {name} after step {stop.step}; checkpoint "
                f"{stop.checkpoint}\n  resume with: {resume_command(command, argv)}",
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
