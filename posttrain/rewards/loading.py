"""Choosing a reward function by name and running it: `get_reward_fn`, `score_responses`.

A name is a built-in (`REWARD_NAMES`) or a user's own function, given as
``"path/to/file.py:function"`` or ``"package.module:function"``; `score_responses` checks
what the function returns and raises `RewardError` naming the example that failed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.rewards.builtin import (
    _BUILTINS,
    _NEEDS_MATH_VERIFY,
    REWARD_KEYS,
    REWARD_NAMES,
    RewardFn,
)


class RewardError(ValueError):
    """A reward function failed on, or returned something unusable for, one example."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------ selection


def get_reward_fn(name: str) -> RewardFn:
    """The reward function called `name`: a built-in (`REWARD_NAMES`) or a user's own.

    A user's function is ``"path/to/file.py:function"`` or ``"package.module:function"``,
    imported only because it was named here. Raises ValueError, in one line, for an
    unknown name, a missing file or module, a missing or non-callable attribute.
    """
    if not isinstance(name, str):
        raise ValueError(f"reward name must be a string, got {type(name).__name__}")
    if name in _BUILTINS:
        if name in _NEEDS_MATH_VERIFY and importlib.util.find_spec("math_verify") is None:
            raise ValueError(f"reward {name!r} needs math-verify: pip install 'math-verify>=0.8'")
        return _BUILTINS[name]
    if ":" in name:
        return _load_custom(name)
    raise ValueError(
        f"unknown reward {name!r}: use one of {', '.join(REWARD_NAMES)}, "
        "or your own as 'path/to/file.py:function' or 'package.module:function'"
    )


def _load_custom(spec: str) -> RewardFn:
    where, _, attr = spec.rpartition(":")
    if not where.strip() or not attr.isidentifier():
        raise ValueError(
            f"custom reward {spec!r} must be 'path/to/file.py:function' "
            "or 'package.module:function'"
        )
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _import_file(Path(where).expanduser())
    else:
        module = _import_module(where)
    if not hasattr(module, attr):
        defined = [
            key
            for key, value in vars(module).items()
            if callable(value)
            and not key.startswith("_")
            and getattr(value, "__module__", None) == module.__name__
        ]
        shown = ", ".join(defined[:8]) + (", ..." if len(defined) > 8 else "")
        raise ValueError(f"{where} has no {attr!r}; callables defined there: {shown or 'none'}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"{spec} is a {type(fn).__name__}, not a callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none; calling will tell
        return fn
    try:
        signature.bind("response", "ground_truth")
    except TypeError as e:
        raise ValueError(
            f"{spec} must accept (response, ground_truth), its signature is {signature}: {e}"
        ) from None
    return fn


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"reward file not found: {path}")
    resolved = path.resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"_posttrain_reward_{stem}_{zlib.crc32(str(resolved).encode()):08x}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward file {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickle look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ValueError(
            f"could not import reward file {path}: {type(e).__name__}: {_one_line(e)}"
        ) from e
    return module


def _import_module(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except Exception as e:
        raise ValueError(
            f"reward module {where!r} is not importable: {type(e).__name__}: {_one_line(e)}"
        ) from e


# -------------------------------------------------------------------------- scoring


def _qualified_name(fn: Any) -> str:
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and callable(inner):
        return f"partial({_qualified_name(inner)})"
    owner = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(owner, '__module__', '?')}.{owner.__qualname__}"


def _checked(scores: Any) -> dict[str, float]:
    if not isinstance(scores, Mapping):
        raise ValueError(f"returned a {type(scores).__name__}, not a dict with {REWARD_KEYS}")
    missing = [key for key in REWARD_KEYS if key not in scores]
    if missing:
        raise ValueError(f"returned no {', '.join(missing)} (keys: {sorted(map(str, scores))})")
    checked = {}
    for key in REWARD_KEYS:
        value = scores[key]
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise ValueError(f"{key} is a {type(value).__name__}, not a number")
        checked[key] = float(value)
        if not math.isfinite(checked[key]):
            raise ValueError(f"{key} is {checked[key]}")
    return checked


def score_responses(
    reward_fn: RewardFn, responses: Sequence[str], ground_truths: Sequence[str]
) -> list[dict[str, float]]:
    """`reward_fn` on each (response, ground truth) pair, as plain float dicts.

    Raises RewardError naming the example index and the function when it raises or
    returns something other than finite numbers under the three keys.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"{len(responses)} responses but {len(ground_truths)} ground truths; they must pair up"
        )
    results = []
    for index, (response, truth) in enumerate(zip(responses, ground_truths, strict=True)):
        try:
            results.append(_checked(reward_fn(response, truth)))
        except Exception as e:
            raise RewardError(
                f"reward function {_qualified_name(reward_fn)} failed on example {index}: "
                f"{type(e).__name__}: {_one_line(e)}"
            ) from e
    return results
