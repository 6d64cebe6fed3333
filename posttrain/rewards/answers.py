"""Reading answers out of text: GSM8K numbers, ``\\boxed{}`` contents, MMLU option letters.

Pure string work with no scoring: the reward functions in `builtin` grade what these find.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any


def _text(value: Any, what: str) -> str:
    """`value` as a string; numbers are accepted because datasets often store answers so."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"{what} must be a string, got {type(value).__name__}")


# ---------------------------------------------------------------------------- gsm8k

# A minus sign counts only where it cannot be a subtraction ("3-4" is 4, "x = -4" is -4);
# commas count only as thousands separators, so "3,4" is two numbers.
_NUMBER = re.compile(
    r"(?:\$\s?)?(?:(?<![\w)\]}])(?P<sign>[-−])\s?)?\$?\s?"
    r"(?P<digits>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+)"
)


def parse_gsm8k_response(model_output: str) -> str | None:
    """The last number in `model_output` as a plain decimal string, or None if it has none.

    Thousands separators, a ``$`` and a sentence's final period are dropped and a leading
    minus kept: ``"... costs $1,250."`` gives ``"1250"``, ``"x = -3.5"`` gives ``"-3.5"``.
    """
    last = None
    for last in _NUMBER.finditer(_text(model_output, "model_output")):  # noqa: B007
        pass
    if last is None:
        return None
    digits = last["digits"].replace(",", "")
    if digits.startswith("."):
        digits = "0" + digits
    return ("-" if last["sign"] else "") + digits


def gsm8k_gold_answer(ground_truth: str) -> str:
    """The number a GSM8K answer ends with: ``"...#### 72"`` gives ``"72"``.

    Raises ValueError when there is no number, a data error no response could score on.
    """
    text = _text(ground_truth, "ground_truth")
    number = parse_gsm8k_response(text.rsplit("####", 1)[-1])
    if number is None:
        raise ValueError(f"GSM8K ground truth has no number: {text[-80:]!r}")
    return number


# ----------------------------------------------------------------------------- math

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in `text`, or None.

    Braces nest (``\\boxed{\\frac{1}{\\sqrt{2}}}``) and escaped braces (``\\{``) do not
    count. An unclosed last box, as in a truncated generation, gives None.
    """
    last = None
    for last in _BOXED.finditer(text):  # noqa: B007
        pass
    if last is None:
        return None
    depth, i = 1, last.end()
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[last.end() : i].strip()
        i += 1
    return None


def _bare(answer: str) -> str:
    """`answer` without surrounding whitespace, math delimiters and a final period."""
    answer = answer.strip()
    for left, right in _DELIMITERS:
        fits = len(answer) > len(left) + len(right)
        if fits and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : -len(right)].strip()
            break
    return answer.removesuffix(".").strip()


def _gold_math_answer(ground_truth: str) -> str:
    """The gold answer: the last box of a worked solution, or the whole string."""
    text = _text(ground_truth, "ground_truth")
    boxed = last_boxed(text)
    answer = _bare(boxed if boxed is not None else text)
    if not answer:
        raise ValueError(f"math ground truth has no answer: {text[-80:]!r}")
    return answer


# ----------------------------------------------------------------------------- mmlu

_MMLU_LETTERS = "ABCD"
_MMLU_CHOICE = re.compile(
    r"\banswer\s*(?:is|:|=)?\s*(?:option|choice)?\s*:?\s*\**\s*[(\[]?\s*(?P<letter>[A-D])\s*[)\]]?"
    r"(?=$|[\s.,;:!?)\]*])",
    re.IGNORECASE,
)
_MMLU_BARE = re.compile(r"\(?(?P<letter>[A-D])\)?\.?", re.IGNORECASE)


def parse_mmlu_response(mmlu_example: Mapping[str, Any], model_output: str) -> str | None:
    """The option letter (A-D) chosen in `model_output`, or None when none is chosen.

    Reads the last "... answer is B" / "Answer: (b)" / "the correct answer is **C**", in
    any case, and a reply that is only a letter. A lowercase "a" followed by a word is the
    article ("the answer is a guess"), not option A. `mmlu_example` (with "question",
    "options", "answer") is taken for the CS336 signature; only its type is checked.
    """
    if not isinstance(mmlu_example, Mapping):
        raise TypeError(f"mmlu_example must be a mapping, got {type(mmlu_example).__name__}")
    text = _text(model_output, "model_output")
    chosen = None
    for match in _MMLU_CHOICE.finditer(text):
        letter = match["letter"]
        if letter == "a" and re.match(r"\s+\w", text[match.end() :]):
            continue
        chosen = letter.upper()
    if chosen is None and (bare := _MMLU_BARE.fullmatch(text.strip())):
        chosen = bare["letter"].upper()
    return chosen
