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
import traceback
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

# The attribute of a module loaded from a reward file that holds the path as given.
_USER_FILE = "__posttrain_reward_file__"


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
        label, names = _offered(module)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"{where} has no {attr!r}; {label}: {shown or 'none'}")
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


def _offered(module: Any) -> tuple[str, list[str]]:
    """What a module offers to name instead: the public callables it defines, else the
    functions it exports (`__all__`, or its public names), as a package's __init__
    re-exports those of its modules."""
    names = getattr(module, "__all__", None) or list(vars(module))
    values = {key: getattr(module, key, None) for key in names if not key.startswith("_")}
    own = [
        key
        for key, value in values.items()
        if callable(value) and getattr(value, "__module__", None) == module.__name__
    ]
    if own:
        return "callables defined there", own
    return "functions it exports", [key for key, v in values.items() if inspect.isroutine(v)]


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
    # Messages name the file as the user wrote it, not this internal module name.
    setattr(module, _USER_FILE, str(path))
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
    """How a reward function is named in messages: `package.module.function`, or
    `path/file.py:function` for one loaded from a file."""
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and callable(inner):
        return f"partial({_qualified_name(inner)})"
    owner = fn if hasattr(fn, "__qualname__") else type(fn)
    module_name = getattr(owner, "__module__", None) or "?"
    user_file = getattr(sys.modules.get(module_name), _USER_FILE, None)
    if user_file is not None:
        return f"{user_file}:{owner.__qualname__}"
    return f"{module_name}.{owner.__qualname__}"


def _where_it_failed(fn: Any, error: BaseException) -> str:
    """` (file.py:LINE)`: the last line of a user's reward file in the error's traceback."""
    module = sys.modules.get(getattr(getattr(fn, "func", fn), "__module__", None) or "")
    user_file = getattr(module, _USER_FILE, None)
    filename = getattr(module, "__file__", None)
    if user_file is None or filename is None:
        return ""
    lines = [t.lineno for t in traceback.extract_tb(error.__traceback__) if t.filename == filename]
    return f" ({user_file}:{lines[-1]})" if lines else ""


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
                f"{type(e).__name__}: {_one_line(e)}{_where_it_failed(reward_fn, e)}"
            ) from e
    return results
