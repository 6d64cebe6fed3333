"""`math_equal`: whether two final answers are mathematically equal, within a time limit.

Identical answers and plain numbers are settled here; the rest goes to math-verify in a
worker process (`math_workers`), which a check that runs out of time counts as not equal.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from posttrain.rewards.answers import _bare, _text
from posttrain.rewards.math_workers import verify_equal

# Seconds one equivalence check (parsing both answers and comparing them) may take
# before it counts as not equal; math-verify's own default for each of the two steps.
MATH_TIMEOUT_S = 5.0

_PLAIN_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def _fast_equal(prediction: str, gold: str) -> bool | None:
    """Decide the common cases without math-verify; None when it has to decide.

    Identical answers and plain numbers (``2,000`` == ``2000.0``) are settled here, so
    most checks never wait on a worker process. Unequal decimals are left to math-verify,
    which compares numbers rounded to 6 places.
    """
    p, g = _bare(prediction), _bare(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    if _PLAIN_NUMBER.fullmatch(p) and _PLAIN_NUMBER.fullmatch(g):
        if Decimal(p.replace(",", "")) == Decimal(g.replace(",", "")):
            return True
        if "." not in p and "." not in g:
            return False
    return None


def _check_timeout(timeout_s: float) -> None:
    valid = isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
    if not (valid and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")


def math_equal(prediction: str, gold: str, *, timeout_s: float = MATH_TIMEOUT_S) -> bool:
    """Whether two final answers (LaTeX or plain, no surrounding prose) are equal.

    ``0.5``, ``\\frac{1}{2}`` and ``1/2`` are equal, as are ``2,000`` and ``2000``. A check
    that takes longer than `timeout_s` seconds is False; it never raises for bad LaTeX.
    """
    _check_timeout(timeout_s)
    prediction, gold = _bare(_text(prediction, "prediction")), _bare(_text(gold, "gold"))
    fast = _fast_equal(prediction, gold)
    if fast is not None:
        return fast
    return verify_equal("\\boxed{" + gold + "}", "\\boxed{" + prediction + "}", timeout_s)
