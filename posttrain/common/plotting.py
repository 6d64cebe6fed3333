"""Helpers for the plots that runs and reports draw with matplotlib."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_font_cache() -> Iterator[None]:
    """Wrap the first import of matplotlib: hush its font-cache messages.

    In a fresh environment that import builds the font cache and logs "generated new
    fontManager" (and, after 5 s, "Matplotlib is building the font cache"), which the
    CLI's INFO logging would print into the middle of a run's output.
    """
    font_logger = logging.getLogger("matplotlib.font_manager")
    level = font_logger.level
    font_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        font_logger.setLevel(level)
