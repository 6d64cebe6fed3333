"""What every subcommand module shares, without importing torch."""

from __future__ import annotations

import os


def env_rank() -> int:
    """This process's rank under torchrun (0 outside it): only rank 0 talks to the user."""
    return int(os.environ.get("RANK", "0"))
