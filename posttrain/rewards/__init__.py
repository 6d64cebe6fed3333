"""Verifiable rewards: score a model's response against a ground-truth answer.

A reward function takes ``(response, ground_truth)`` (both strings) and returns a dict
with three float keys::

    {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}

``format_reward`` says whether the response had the expected shape (a number, a boxed
answer, the r1_zero tags, an option letter), ``answer_reward`` whether its answer is
right, and ``reward`` is what an evaluation averages or an RL loop optimises.

Built-ins, by name with `get_reward_fn` (see `REWARD_NAMES`): ``gsm8k``, ``math``,
``r1_zero``, ``mmlu`` and ``exact``. A user's own function is named as
``"path/to/file.py:function"`` or ``"package.module:function"``.

The modules, in the order they build on each other:

- `answers`: reading an answer out of text (GSM8K numbers, ``\\boxed{}``, MMLU letters).
- `math_workers`: the math-verify worker processes, killed when a check runs out of time.
- `math_check`: `math_equal`, plain cases decided at once and the rest by math-verify.
- `builtin`: the built-in reward functions, `REWARD_NAMES`, and what each accepts as a
  gold answer (`VALID_GOLDS`, `gold_error`).
- `loading`: `get_reward_fn` (built-ins and a user's own) and `score_responses`.
"""

from posttrain.rewards.answers import (
    gsm8k_gold_answer,
    last_boxed,
    parse_gsm8k_response,
    parse_mmlu_response,
)
from posttrain.rewards.builtin import (
    REWARD_KEYS,
    REWARD_NAMES,
    VALID_GOLDS,
    RewardFn,
    builtin_name,
    exact_reward,
    gold_error,
    gsm8k_reward,
    math_reward,
    mmlu_reward,
    r1_zero_reward,
)
from posttrain.rewards.loading import RewardError, get_reward_fn, score_responses
from posttrain.rewards.math_check import MATH_TIMEOUT_S, math_equal
from posttrain.rewards.math_workers import (
    WORKER_MEMORY_LIMIT_BYTES,
    WORKER_STARTUP_TIMEOUT_S,
    close_math_workers,
)

__all__ = [
    "MATH_TIMEOUT_S",
    "REWARD_KEYS",
    "REWARD_NAMES",
    "VALID_GOLDS",
    "WORKER_MEMORY_LIMIT_BYTES",
    "WORKER_STARTUP_TIMEOUT_S",
    "RewardError",
    "RewardFn",
    "builtin_name",
    "close_math_workers",
    "exact_reward",
    "get_reward_fn",
    "gold_error",
    "gsm8k_gold_answer",
    "gsm8k_reward",
    "last_boxed",
    "math_equal",
    "math_reward",
    "mmlu_reward",
    "parse_gsm8k_response",
    "parse_mmlu_response",
    "r1_zero_reward",
    "score_responses",
]
