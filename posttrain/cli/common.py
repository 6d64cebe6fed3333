"""What every subcommand module shares, without importing torch.

The checks here run before a command imports torch (1 to 5 s), so that a typo in a flag
or a path answers at once; the deeper checks (file contents, weights) follow later.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from posttrain.config.values import flag

logger = logging.getLogger("posttrain")

# --report-to value -> (module it needs, the extra that installs it).
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


def env_rank() -> int:
    """This process's rank under torchrun (0 outside it): only rank 0 talks to the user."""
    return int(os.environ.get("RANK", "0"))


def check_model_dir(path: str, flag: str = "--model") -> None:
    """`path` is a directory (posttrain loads local model directories only)."""
    if not Path(path).is_dir():
        raise ValueError(
            f"model path {path!r} does not exist or is not a directory (posttrain loads "
            f"local Hugging Face model directories; {flag})"
        )


def check_data_path(path: str | None, flag: str) -> None:
    """`path` (a data file or a datasets directory) exists, when one is given."""
    if path is not None and not Path(path).exists():
        raise ValueError(f"data file not found: {path} ({flag})")


def check_tracker(report_to: str) -> None:
    """The package `--report-to` needs is installed: said at start, not after the model
    has loaded, with the command that installs it."""
    if report_to not in TRACKER_PACKAGES:
        return
    module, extra = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"--report-to {report_to} needs the {module} package, which is not installed: "
            f"pip install 'posttrain[{extra}]' (or --report-to none)"
        )


TRAINING_DATA = ("train_file", "eval_file", "eval_generate_file")


def check_run_inputs(
    command: str,
    config: Any,
    data_settings: tuple[str, ...] = TRAINING_DATA,
    reward_trains: bool = False,
) -> None:
    """A training command's model directory and data files exist and its tracker is
    installed, before torch is imported. Unless the reward is what the method trains on
    (`reward_trains`), a reward without `eval_generate_file` is warned about: it would be
    ignored."""
    check_model_dir(config.model)
    for name in data_settings:
        check_data_path(getattr(config, name), flag(name))
    check_tracker(config.report_to)
    unused_reward = config.reward is not None and config.eval_generate_file is None
    if not reward_trains and unused_reward and env_rank() == 0:
        logger.warning(
            "posttrain %s: --reward %s is ignored without --eval-generate-file (the "
            "prompts with gold answers it would score)",
            command,
            config.reward,
        )
