"""What every subcommand module shares, without importing torch.

The checks here run before a command imports torch (1 to 5 s), so that a typo in a flag
or a path answers at once; the deeper checks (file contents, weights) follow later.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

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
