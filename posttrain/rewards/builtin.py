"""The built-in reward functions, by name in `REWARD_NAMES`: gsm8k, math, r1_zero, mmlu, exact.

Each takes ``(response, ground_truth)`` and returns the three `REWARD_KEYS` as floats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal

from posttrain.rewards.answers import (
    _MMLU_LETTERS,
    _bare,
    _gold_math_answer,
    _text,
    gsm8k_gold_answer,
    last_boxed,
    parse_gsm8k_response,
    parse_mmlu_response,
)
from posttrain.rewards.math_check import MATH_TIMEOUT_S, _check_timeout, _fast_equal, math_equal
from posttrain.rewards.math_workers import verify_equal

RewardFn = Callable[[str, str], Mapping[str, float]]

REWARD_KEYS = ("reward", "format_reward", "answer_reward")


def _rewards(format_reward: float, answer_reward: float, reward: float) -> dict[str, float]:
    return {
        "reward": float(reward),
        "format_reward": float(format_reward),
        "answer_reward": float(answer_reward),
    }


# ---------------------------------------------------------------------------- gsm8k


def gsm8k_reward(response: str, ground_truth: str) -> dict[str, float]:
    """1 when the response's last number equals the gold number (``72.0`` == ``72``).

    format_reward is 1 when the response contains a number at all.
    """
    gold = Decimal(gsm8k_gold_answer(ground_truth))
    predicted = parse_gsm8k_response(_text(response, "response"))
    if predicted is None:
        return _rewards(0.0, 0.0, 0.0)
    correct = float(Decimal(predicted) == gold)
    return _rewards(1.0, correct, correct)


# ----------------------------------------------------------------------------- math


def _math_answer_reward(text: str, ground_truth: str, timeout_s: float) -> tuple[float, float]:
    """(format, answer) of `text`: its last box, else whatever final answer math-verify finds."""
    _check_timeout(timeout_s)
    gold = _gold_math_answer(ground_truth)
    boxed = last_boxed(text)
    if boxed is not None:
        return 1.0, float(math_equal(boxed, gold, timeout_s=timeout_s))
    fast = _fast_equal(text, gold)
    if fast is not None:
        return 0.0, float(fast)
    # math-verify's extraction prefers "final answer is ..." and otherwise the last
    # expression, which is what an unboxed response most often means.
    return 0.0, float(verify_equal("\\boxed{" + gold + "}", text, timeout_s))


def math_reward(
    response: str, ground_truth: str, *, timeout_s: float = MATH_TIMEOUT_S
) -> dict[str, float]:
    """MATH-style: the last ``\\boxed{}`` (or the final answer) against the gold answer.

    `ground_truth` may be the answer or a worked solution ending in a box. format_reward
    is 1 when the response boxes its answer; an unboxed right answer still earns reward 1.
    """
    format_reward, answer = _math_answer_reward(
        _text(response, "response"), ground_truth, timeout_s
    )
    return _rewards(format_reward, answer, answer)


_THINK_ANSWER = "</think> <answer>"
_ANSWER_END = "</answer>"


def r1_zero_reward(
    response: str, ground_truth: str, *, timeout_s: float = MATH_TIMEOUT_S
) -> dict[str, float]:
    """The r1_zero convention (Dr. GRPO, CS336): ``... </think> <answer> ... </answer>``.

    Formatted means ``</think> <answer>`` followed later by ``</answer>``; an unformatted
    response scores 0 everywhere without being graded. The text between the tags is graded
    like `math_reward`, and reward equals answer_reward.
    """
    response = _text(response, "response")
    start = response.rfind(_THINK_ANSWER)
    end = response.find(_ANSWER_END, start + len(_THINK_ANSWER)) if start >= 0 else -1
    if end < 0:
        return _rewards(0.0, 0.0, 0.0)
    inside = response[start + len(_THINK_ANSWER) : end]
    _, answer = _math_answer_reward(inside, ground_truth, timeout_s)
    return _rewards(1.0, answer, answer)


# ----------------------------------------------------------------------------- mmlu


def _mmlu_gold(ground_truth: str) -> str:
    gold = _bare(_text(ground_truth, "ground_truth")).strip("()").upper()
    if len(gold) != 1 or gold not in _MMLU_LETTERS:
        raise ValueError(f"MMLU ground truth must be one of A, B, C, D, got {ground_truth!r}")
    return gold


def mmlu_reward(response: str, ground_truth: str) -> dict[str, float]:
    """1 when the chosen letter equals `ground_truth`, the gold letter (A-D, any case).

    The reward signature has no room for the MMLU example, so parsing runs on a minimal
    ``{"answer": ground_truth}``; the options are not needed to read a letter.
    """
    gold = _mmlu_gold(ground_truth)
    chosen = parse_mmlu_response({"answer": gold}, response)
    if chosen is None:
        return _rewards(0.0, 0.0, 0.0)
    correct = float(chosen == gold)
    return _rewards(1.0, correct, correct)


# ---------------------------------------------------------------------------- exact


def exact_reward(response: str, ground_truth: str) -> dict[str, float]:
    """1 when the stripped response equals the stripped gold answer; format = non-empty."""
    answer = _text(response, "response").strip()
    correct = float(answer == _text(ground_truth, "ground_truth").strip())
    return _rewards(float(bool(answer)), correct, correct)


# ------------------------------------------------------------------------ by name

_BUILTINS: dict[str, RewardFn] = {
    "gsm8k": gsm8k_reward,
    "math": math_reward,
    "r1_zero": r1_zero_reward,
    "mmlu": mmlu_reward,
    "exact": exact_reward,
}
REWARD_NAMES: tuple[str, ...] = tuple(_BUILTINS)
_NEEDS_MATH_VERIFY = ("math", "r1_zero")

# What each built-in accepts as a gold answer, and the check that refuses anything else
# (raising ValueError), run over a data set before anything is generated.
VALID_GOLDS: dict[str, str] = {
    "gsm8k": "a number, or a worked solution ending in '#### <number>'",
    "math": "a final answer such as '\\frac{1}{2}', or a worked solution ending in \\boxed{...}",
    "r1_zero": "a final answer such as '\\frac{1}{2}', or a worked solution ending in \\boxed{...}",
    "mmlu": "one option letter, A to D",
    "exact": "any string",
}
_GOLD_CHECKS: dict[str, Callable[[str], object]] = {
    "gsm8k": gsm8k_gold_answer,
    "math": _gold_math_answer,
    "r1_zero": _gold_math_answer,
    "mmlu": _mmlu_gold,
}


def builtin_name(reward_fn: object) -> str | None:
    """The `REWARD_NAMES` name of a built-in reward (or a functools.partial of one, e.g.
    with another `timeout_s`), else None."""
    inner = getattr(reward_fn, "func", reward_fn)
    return next((name for name, fn in _BUILTINS.items() if fn is inner), None)


def gold_error(reward_fn: object, gold: str) -> str | None:
    """Why `gold` is no gold answer `reward_fn` can score against (None when it is, or when
    the reward is not a built-in: a user's own function knows its own golds)."""
    name = builtin_name(reward_fn)
    check = _GOLD_CHECKS.get(name or "")
    if check is None:
        return None
    try:
        check(gold)
    except (TypeError, ValueError):
        return f"is not a valid gold for reward {name!r}: it must be {VALID_GOLDS[name]}"
    return None
