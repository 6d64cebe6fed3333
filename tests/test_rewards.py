"""Rewards: hand-checked cases per built-in, custom loading, scoring errors, timeouts."""

from __future__ import annotations

import math
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain import rewards
from posttrain.rewards import (
    REWARD_NAMES,
    RewardError,
    exact_reward,
    get_reward_fn,
    gsm8k_gold_answer,
    gsm8k_reward,
    last_boxed,
    math_equal,
    math_reward,
    math_workers,
    mmlu_reward,
    parse_gsm8k_response,
    parse_mmlu_response,
    r1_zero_reward,
    score_responses,
)

ONE = {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}
WRONG = {"reward": 0.0, "format_reward": 1.0, "answer_reward": 0.0}
ZERO = {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}


@pytest.fixture(scope="module", autouse=True)
def stop_workers():
    yield
    rewards.close_math_workers()


# ---------------------------------------------------------------------------- gsm8k


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Natalia sold 48 + 24 = 72 clips.", "72"),
        ("The answer is 72.", "72"),
        ("It costs $1,250.", "1250"),
        ("He pays $ 18 per day", "18"),
        ("x = -3.5", "-3.5"),
        ("The temperature fell to −7 degrees", "-7"),
        ("-$5 is the balance", "-5"),
        ("pages 3-4", "4"),
        ("about .5 of it", "0.5"),
        ("1,000,000 people", "1000000"),
        ("the numbers 3,4", "4"),
        ("72.0", "72.0"),
        ("no number here", None),
        ("", None),
    ],
)
def test_parse_gsm8k_response(text, number):
    assert parse_gsm8k_response(text) == number


def test_gsm8k_gold_reduction():
    gold = "She sold 48/2 = <<48/2=24>>24 in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    assert gsm8k_gold_answer(gold) == "72"
    assert gsm8k_gold_answer("#### 1,000") == "1000"
    assert gsm8k_gold_answer("-4") == "-4"
    with pytest.raises(ValueError, match="GSM8K ground truth has no number"):
        gsm8k_gold_answer("#### none")


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("So she sold 72 clips.", "#### 72", ONE),
        ("The answer is 72.0", "72", ONE),
        ("Total: $1,000.", "#### 1000", ONE),
        ("Total: 1000", "#### 1,000", ONE),
        ("The loss is -15 dollars", "#### -15", ONE),
        ("I got 71 first, then 73.", "#### 72", WRONG),
        ("I cannot tell.", "#### 72", ZERO),
    ],
)
def test_gsm8k_reward(response, gold, expected):
    assert gsm8k_reward(response, gold) == expected


_PREFIX = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABCXYZ,:?", max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(-(10**12), 10**12),
    prefix=_PREFIX,
    end=st.sampled_from(["", ".", "!", " apples."]),
)
def test_gsm8k_commas_roundtrip(n, prefix, end):
    text = f"{prefix} {n:,}{end}"
    assert parse_gsm8k_response(text) == str(n)
    assert gsm8k_reward(text, f"work\n#### {n}")["reward"] == 1.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 10**6), other=st.integers(0, 10**6))
def test_gsm8k_reward_is_numeric_equality(n, other):
    assert gsm8k_reward(f"${other:,}.00", f"#### {n}")["answer_reward"] == float(n == other)


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("text", "content"),
    [
        (r"so \boxed{5}", "5"),
        (r"\boxed{1} then \boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\frac{1}{2}", None),  # truncated
        ("no box", None),
    ],
)
def test_last_boxed(text, content):
    assert last_boxed(text) == content


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"Thus \boxed{0.5}.", r"\frac{1}{2}"),
        (r"Thus \boxed{\frac{1}{2}}.", "1/2"),
        (r"Thus \boxed{1/2}.", "0.5"),
        (r"Thus \boxed{2,000}", "2000"),
        (r"Thus \boxed{2000}", "2,000"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}"),
        (r"\fbox{\frac12}", "$0.5$"),
        (r"\boxed{x = 5}", "5"),
        ("The final answer is 0.5", r"\frac{1}{2}"),
        ("72", "72.0"),
        (r"\boxed{5}", r"We find $x=5$, so the answer is $\boxed{5}$."),
    ],
)
def test_math_equivalent(response, gold):
    assert math_reward(response, gold)["answer_reward"] == 1.0


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{3}", "2"),
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{}", "2"),
        (r"\boxed{x+1}", "x+2"),
        ("I give up", "2"),
    ],
)
def test_math_not_equivalent(response, gold):
    assert math_reward(response, gold)["answer_reward"] == 0.0


def test_math_format_is_the_box():
    assert math_reward(r"so \boxed{\frac{1}{2}}", "0.5") == ONE
    assert math_reward("The final answer is 0.5", r"\frac12") == {
        "reward": 1.0,
        "format_reward": 0.0,
        "answer_reward": 1.0,
    }
    with pytest.raises(ValueError, match="math ground truth has no answer"):
        math_reward(r"\boxed{1}", "  ")


def test_math_fast_path_needs_no_worker(monkeypatch):
    def no_worker():
        raise AssertionError("the fast path must not start a worker")

    monkeypatch.setattr(math_workers, "_pool", no_worker)
    assert math_equal("2,000", "2000")
    assert math_equal("$72$", "72.0")
    assert not math_equal("72", "73")
    assert math_reward(r"\boxed{-3}", "-3.0") == ONE


# -------------------------------------------------------------------------- r1_zero


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("reasoning </think> <answer> 0.5 </answer>", ONE),
        (r"reasoning </think> <answer> \boxed{\frac{1}{2}} </answer>", ONE),
        ("reasoning </think> <answer> 3 </answer>", WRONG),
        ("reasoning </think> <answer> 0.5", ZERO),  # never closed
        ("reasoning </think><answer> 0.5 </answer>", ZERO),  # no space between the tags
        ("</answer> reasoning </think> <answer> 0.5", ZERO),  # closing tag before
        (r"no tags, \boxed{\frac12}", ZERO),
    ],
)
def test_r1_zero(response, expected):
    assert r1_zero_reward(response, r"\frac{1}{2}") == expected


# ----------------------------------------------------------------------------- mmlu

EXAMPLE = {"question": "2+2?", "options": ["3", "4", "5", "6"], "answer": "B"}


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The correct answer is B", "B"),
        ("the correct answer is b.", "B"),
        ("THE CORRECT ANSWER IS C", "C"),
        ("Answer: (D)", "D"),
        ("The answer is **A**.", "A"),
        ("The answer is option c", "C"),
        ("First A? No. The correct answer is B.", "B"),
        ("the correct answer is a.", "A"),
        ("The answer is a tricky one", None),
        ("(c)", "C"),
        ("The answer is E", None),
        ("I do not know", None),
    ],
)
def test_parse_mmlu_response(text, letter):
    assert parse_mmlu_response(EXAMPLE, text) == letter


def test_mmlu_reward():
    assert mmlu_reward("The correct answer is B", "B") == ONE
    assert mmlu_reward("The correct answer is B", "b") == ONE
    assert mmlu_reward("The correct answer is C", "B") == WRONG
    assert mmlu_reward("No idea", "B") == ZERO
    with pytest.raises(ValueError, match="must be one of A, B, C, D"):
        mmlu_reward("The correct answer is B", "E")
    with pytest.raises(TypeError, match="mmlu_example must be a mapping"):
        parse_mmlu_response(["B"], "The correct answer is B")


# ---------------------------------------------------------------------------- exact


def test_exact_reward():
    assert exact_reward("  bszcad\n", "bszcad ") == ONE
    assert exact_reward("bszcad", "bszcaD") == WRONG
    assert exact_reward("   ", "x") == ZERO
    with pytest.raises(TypeError, match="response must be a string"):
        exact_reward(None, "x")


# ------------------------------------------------------------------------ selection


def test_builtins_by_name():
    assert REWARD_NAMES == ("gsm8k", "math", "r1_zero", "mmlu", "exact")
    assert get_reward_fn("gsm8k") is gsm8k_reward
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("r1_zero") is r1_zero_reward
    assert get_reward_fn("mmlu") is mmlu_reward
    assert get_reward_fn("exact") is exact_reward


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as info:
        get_reward_fn("gsm9k")
    message = str(info.value)
    assert "\n" not in message
    for name in (*REWARD_NAMES, "file.py:function", "package.module:function"):
        assert name in message


def _write(path, source):
    path.write_text(textwrap.dedent(source))
    return path


def test_custom_reward_from_file(tmp_path):
    path = _write(
        tmp_path / "my_reward.py",
        """
        def length_reward(response, ground_truth):
            ok = float(len(response) == len(ground_truth))
            return {"reward": ok, "format_reward": 1.0, "answer_reward": ok}
        """,
    )
    fn = get_reward_fn(f"{path}:length_reward")
    assert fn("abc", "xyz")["reward"] == 1.0
    assert score_responses(fn, ["ab", "abc"], ["xyz", "xyz"])[1]["reward"] == 1.0


def test_custom_reward_from_module(tmp_path, monkeypatch):
    package = tmp_path / "userpkg_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _write(
        package / "scoring.py",
        """
        def always(response, ground_truth):
            return {"reward": 1, "format_reward": 1, "answer_reward": 1}
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward_fn("userpkg_rewards.scoring:always")
    assert score_responses(fn, ["x"], ["y"]) == [ONE]


@pytest.fixture
def bad_file(tmp_path):
    return _write(
        tmp_path / "bad.py",
        """
        THRESHOLD = 3

        def helper(response, ground_truth):
            return {}

        def one_arg(response):
            return {}

        class Scorer:
            pass
        """,
    )


def test_custom_reward_errors(tmp_path, bad_file):
    cases = {
        f"{tmp_path}/missing.py:fn": "reward file not found",
        "no_such_module_xyz.sub:fn": "reward module 'no_such_module_xyz.sub' is not importable",
        f"{bad_file}:nope": "has no 'nope'; callables defined there: helper, one_arg, Scorer",
        f"{bad_file}:THRESHOLD": "is a int, not a callable",
        f"{bad_file}:one_arg": "must accept (response, ground_truth)",
        f"{bad_file}:": "must be 'path/to/file.py:function'",
        "json:": "must be 'path/to/file.py:function'",
    }
    for spec, expected in cases.items():
        with pytest.raises(ValueError) as info:
            get_reward_fn(spec)
        assert expected in str(info.value), spec
        assert "\n" not in str(info.value)


def test_custom_reward_file_that_fails_to_import(tmp_path):
    path = _write(tmp_path / "broken.py", "raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"could not import reward file .*RuntimeError: boom"):
        get_reward_fn(f"{path}:fn")
    syntax = _write(tmp_path / "syntax.py", "def f(:\n")
    with pytest.raises(ValueError, match="SyntaxError"):
        get_reward_fn(f"{syntax}:f")


def test_missing_function_in_a_package_lists_what_it_exports():
    # The package's __init__ defines nothing itself: it re-exports its modules' functions.
    with pytest.raises(ValueError) as info:
        get_reward_fn("posttrain.rewards:nosuch")
    message = str(info.value)
    assert "posttrain.rewards has no 'nosuch'; functions it exports: " in message
    assert "exact_reward" in message and "none" not in message


def test_a_failing_reward_file_is_named_as_the_user_wrote_it(tmp_path):
    path = _write(
        tmp_path / "myreward.py",
        """
        def boom(response, ground_truth):
            return {"reward": 1 / 0}
        """,
    )
    with pytest.raises(RewardError) as info:
        score_responses(get_reward_fn(f"{path}:boom"), ["a"], ["b"])
    message = str(info.value)
    assert f"reward function {path}:boom failed on example 0: ZeroDivisionError" in message
    assert message.endswith(f"({path}:3)")  # the line of the user's file that raised
    assert "_posttrain_reward" not in message


@pytest.mark.parametrize(
    ("name", "good", "bad", "valid"),
    [
        ("gsm8k", ["72", "work\n#### 1,250", 7], ["no number", "####"], "#### <number>"),
        ("math", ["\\frac{1}{2}", "so \\boxed{3}"], ["", "  $ $ "], "\\boxed{...}"),
        ("r1_zero", ["0.5"], [" "], "a final answer"),
        ("mmlu", ["B", "(c)", " d. "], ["E", "B or C", "42", ""], "one option letter, A to D"),
        ("exact", ["", "anything"], [], "any string"),
    ],
)
def test_each_builtin_says_what_a_valid_gold_is(name, good, bad, valid):
    reward_fn = get_reward_fn(name)
    assert valid in rewards.VALID_GOLDS[name]
    assert rewards.builtin_name(reward_fn) == name
    for gold in good:
        assert rewards.gold_error(reward_fn, str(gold)) is None, gold
    for gold in bad:
        problem = rewards.gold_error(reward_fn, gold)
        assert (
            problem
            == f"is not a valid gold for reward {name!r}: it must be " + (rewards.VALID_GOLDS[name])
        )
        # What the check refuses, the reward itself cannot score.
        with pytest.raises(ValueError):
            reward_fn("The answer is B, 72 </think> <answer>\\boxed{1}</answer>", gold)
    # A user's own reward knows its own golds: nothing is checked for it.
    assert rewards.gold_error(lambda r, g: {}, "E") is None


# -------------------------------------------------------------------------- scoring


def test_score_responses_builtin():
    scores = score_responses(gsm8k_reward, ["so 72", "so 71", "?"], ["#### 72"] * 3)
    assert [s["reward"] for s in scores] == [1.0, 0.0, 0.0]


def _raises_on_second(response, ground_truth):
    if response == "bad":
        raise KeyError("oops")
    return {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ({"reward": 1.0, "format_reward": 1.0}, "returned no answer_reward"),
        ({"reward": math.nan, "format_reward": 1.0, "answer_reward": 1.0}, "reward is nan"),
        ({"reward": "1", "format_reward": 1.0, "answer_reward": 1.0}, "reward is a str"),
        (1.0, "returned a float, not a dict"),
    ],
)
def test_score_responses_bad_return(returned, expected):
    def fn(response, ground_truth):
        return returned

    with pytest.raises(RewardError, match=expected) as info:
        score_responses(fn, ["a"], ["b"])
    assert "example 0" in str(info.value)


def test_score_responses_names_index_and_function():
    with pytest.raises(RewardError) as info:
        score_responses(_raises_on_second, ["ok", "bad", "ok"], ["g"] * 3)
    message = str(info.value)
    assert "example 1" in message
    assert f"{__name__}._raises_on_second" in message
    assert "KeyError" in message
    assert isinstance(info.value.__cause__, KeyError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        score_responses(gsm8k_reward, ["a", "b"], ["1"])


# ------------------------------------------------------------------------- timeouts

# sympy computes 9^(9^9), a 370-million-digit integer, in C while holding the GIL: no
# signal or thread can interrupt it, only killing the process that runs it.
PATHOLOGICAL = r"\boxed{9^{9^{9}}}"


def test_timeout_from_a_non_main_thread():
    assert math_equal(r"\frac{1}{2}", "0.5")  # starts a worker, outside the timed part
    limit = 1.0

    def timed():
        start = time.perf_counter()
        scores = math_reward(PATHOLOGICAL, "2", timeout_s=limit)
        return scores, time.perf_counter() - start, threading.current_thread()

    with ThreadPoolExecutor(max_workers=1) as pool:
        scores, elapsed, thread = pool.submit(timed).result(timeout=60)
    assert thread is not threading.main_thread()
    assert scores == WRONG
    assert limit <= elapsed < limit + 2.0
    # The killed worker is replaced: the next check works (and r1_zero shares the path).
    assert r1_zero_reward(r"</think> <answer> \boxed{\frac{1}{2}} </answer>", "0.5") == ONE


def test_concurrent_checks_from_threads():
    cases = [(rf"\boxed{{\frac{{1}}{{{d}}}}}", str(1 / d), 1.0) for d in (2, 4, 5, 8)]
    cases += [(rf"\boxed{{\frac{{1}}{{{d}}}}}", "0.3", 0.0) for d in (2, 4, 5, 8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: math_reward(c[0], c[1])["reward"], cases * 2))
    assert results == [c[2] for c in cases * 2]


def test_worker_killed_while_idle_is_replaced():
    assert math_equal(r"\frac{1}{4}", "0.25")
    pool = math_workers._pool()
    with pool._cond:
        victims = list(pool._idle)
    for worker in victims:
        worker.process.kill()
        worker.process.wait()
    assert math_equal(r"\frac{3}{4}", "0.75")
    assert not math_equal(r"\frac{3}{4}", "0.7")


def test_bad_timeout_is_rejected():
    for bad in (0, -1.0, math.inf, "5", True):
        with pytest.raises(ValueError, match="timeout_s must be a positive number"):
            math_equal("2", "2", timeout_s=bad)
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        math_reward(r"\boxed{2}", "2", timeout_s=0)


def test_worker_that_cannot_start_raises_clearly(monkeypatch):
    rewards.close_math_workers()
    monkeypatch.setattr(math_workers, "_BOOT", 'print(\'{"error": "no math here"}\', flush=True)')
    with pytest.raises(RuntimeError, match="did not start: no math here"):
        math_equal(r"\frac{1}{2}", "0.4")
    monkeypatch.setattr(math_workers, "_BOOT", "raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="did not start: it exited or did not answer"):
        math_equal(r"\frac{1}{2}", "0.4")
    assert math_workers._pool()._count == 0  # failed starts leave no slot taken
    rewards.close_math_workers()
