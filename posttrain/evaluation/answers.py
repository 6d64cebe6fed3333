"""Generation-based evaluation: generate answers to prompts, score them against gold
answers with a reward function, and summarise (accuracy, pass@k, lengths, truncation).

`evaluate_answers` is the library entry point, used by `posttrain eval` and by the
trainer; the loss-based held-out evaluation lives in `posttrain.evaluation.held_out_loss`.

Results do not depend on the number of ranks. Prompts are sorted by token length and cut
into batches of `batch_size` exactly as `posttrain.generation.decode.generate` does; batch `b`
is sampled with seed `seed + b` (what `generate` itself uses for it), and under
torch.distributed rank `r` runs batches r, r + W, r + 2W, ... of the same plan. So one
process, any number of ranks and a direct `generate(..., seed=seed)` call give the same
samples, greedy or sampled (on the same device type and numerics).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from posttrain.common.distributed import DistInfo, is_fsdp, unwrap_model
from posttrain.common.jsonl import write_jsonl
from posttrain.data.records import read_rows
from posttrain.generation.decode import Sample, batch_order, encode_prompts, generate
from posttrain.rewards import RewardError, RewardFn, gold_error, score_responses

# A sample counts as correct when its answer_reward reaches this (built-ins give 0 or 1).
CORRECT_AT = 1.0

SAMPLE_FIELDS = (
    "index",
    "sample",
    "prompt",
    "response",
    "gold",
    "reward",
    "format_reward",
    "answer_reward",
    "num_tokens",
    "truncated",
    "finish_reason",
    "mean_entropy",
)


@dataclass
class EvalResult:
    """What `evaluate_answers` returns, the same on every rank.

    `summary`: metric name -> number (see `summarize_samples`). `samples`: one dict per
    sample with the keys of `SAMPLE_FIELDS`, in input order, the `n` samples of each
    prompt adjacent (sample 0 to n - 1).
    """

    summary: dict[str, float | int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


def _check_inputs(
    prompts: Sequence[Any],
    golds: Sequence[Any],
    reward_fn: RewardFn,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
) -> None:
    # Checked before any rank-dependent work, so that every rank raises the same error
    # rather than some waiting forever in a collective.
    if isinstance(prompts, str) or isinstance(golds, str):
        raise ValueError("prompts and golds must be sequences, not one string")
    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold answers")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    for i, gold in enumerate(golds):
        if not isinstance(gold, str):
            raise ValueError(f"gold answer {i} is a {type(gold).__name__}, not a string")
        # Before anything is generated: a gold the reward cannot score would otherwise
        # stop the run after the first batch (or the first training evaluation).
        problem = gold_error(reward_fn, gold)
        if problem is not None:
            raise ValueError(f"gold answer {i} {_shown(gold)} {problem}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if n > 1 and temperature == 0:
        raise ValueError(f"n = {n} needs temperature > 0: greedy samples would all be identical")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


# --------------------------------------------------------------------------- data

# Where a question and its gold answer are read from when no flag names the field: the
# first of these a row has. One rule for `posttrain eval` and for generation evaluation
# during `posttrain sft`, so GSM8K's files (question / answer) and posttrain's training
# files (prompt / response or completion) work as they are.
QUESTION_FIELDS = ("prompt", "question")
GOLD_FIELDS = ("answer", "response", "completion")


@dataclass
class EvalData:
    """Questions and gold answers read from a file; `sources[i]` is "file:line" or
    "file:row N" of example i."""

    questions: list[str]
    golds: list[str]
    sources: list[str]


def eval_field(
    row: Mapping[str, Any],
    name: str | None,
    candidates: Sequence[str],
    source: str,
    flag: str,
    numbers: bool,
) -> str:
    """The text of a row's question or gold answer: field `name` when one was given (an
    explicit flag wins), else the first of `candidates` (`QUESTION_FIELDS`, `GOLD_FIELDS`)
    the row has. With `numbers`, a number is read as its text. ValueError naming `source`
    (file:line), the fields the row has and `flag` when there is no such field."""
    tried = [name] if name is not None else list(candidates)
    found = next((key for key in tried if key in row), None)
    if found is None:
        also = f" (nor {', '.join(map(repr, tried[1:]))})" if len(tried) > 1 else ""
        fields = ", ".join(map(repr, row)) or "none"
        raise ValueError(
            f"{source}: missing field {tried[0]!r}{also}; fields present: {fields}. "
            f"Set {flag} to the right name"
        )
    value = row[found]
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise ValueError(f"{source}: field {found!r} must be a string, got {got}")
    return value


def load_eval_data(
    path: str | os.PathLike[str],
    prompt_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    flags: tuple[str, str] = ("--prompt-field", "--answer-field"),
    reward_fn: RewardFn | None = None,
) -> EvalData:
    """Questions and gold answers of the first `limit` rows (all when None) of a data file.

    Formats as for `posttrain sft` (JSONL, JSON, Parquet, a datasets save_to_disk
    directory). A field left at None follows the rule of `eval_field`: the question from
    "prompt", else "question"; the gold from "answer", else "response", else "completion".
    A question must be a string; an answer a string or a number (read as its text). With
    `reward_fn`, every gold answer is checked against what that reward accepts
    (`posttrain.rewards.gold_error`) before anything is generated. Raises ValueError
    naming the file and line (or row) of a bad row; a missing field lists the fields
    present and the flag (`flags`: the prompt and answer flags of the calling command)
    that names it.
    """
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"data set {path} is empty: it has no examples")
    data = EvalData([], [], [])
    for row, source in rows[:limit]:
        if not isinstance(row, dict):
            raise ValueError(f"{source}: expected an object, got {type(row).__name__}")
        question = eval_field(row, prompt_field, QUESTION_FIELDS, source, flags[0], False)
        gold = eval_field(row, answer_field, GOLD_FIELDS, source, flags[1], True)
        problem = None if reward_fn is None else gold_error(reward_fn, gold)
        if problem is not None:
            raise ValueError(f"{source}: gold answer {_shown(gold)} {problem}")
        data.questions.append(question)
        data.golds.append(gold)
        data.sources.append(source)
    return data


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else "..." + text[-limit:])


# --------------------------------------------------------------------------- this rank


def _score(
    reward_fn: RewardFn, index: int, samples: list[Sample], gold: str
) -> list[dict[str, float]]:
    try:
        return score_responses(reward_fn, [s.text for s in samples], [gold] * len(samples))
    except RewardError as exc:
        # score_responses numbers the examples it was given: here, this prompt's samples.
        raise RewardError(f"prompt {index}: {exc}") from exc


def _rows(
    index: int, prompt_text: str, gold: str, samples: list[Sample], scores: list[dict]
) -> list[dict[str, Any]]:
    return [
        {
            "index": index,
            "sample": k,
            "prompt": prompt_text,
            "response": s.text,
            "gold": gold,
            "reward": score["reward"],
            "format_reward": score["format_reward"],
            "answer_reward": score["answer_reward"],
            "num_tokens": s.num_tokens,
            "truncated": s.truncated,
            "finish_reason": s.finish_reason,
            "mean_entropy": s.mean_entropy,
        }
        for k, (s, score) in enumerate(zip(samples, scores, strict=True))
    ]


def _run_share(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    golds: Sequence[str],
    reward_fn: RewardFn,
    batches: list[tuple[int, list[int]]],
    encoded: list[list[int]],
    seed: int,
    generate_kwargs: dict[str, Any],
    progress: Callable[[int, int], None] | None,
) -> list[dict[str, Any]]:
    """Generate and score this rank's `(batch number, prompt indices)`: sample rows."""
    total = sum(len(ids) for _, ids in batches)
    done = 0
    if progress is not None:
        progress(0, total)
    rows: list[dict[str, Any]] = []
    for b, ids in batches:
        # Seed of batch b as `generate` gives it: the plan, not the rank, decides it.
        results = generate(
            model, tokenizer, [encoded[i] for i in ids], seed=seed + b, **generate_kwargs
        )
        for i, samples in zip(ids, results, strict=True):
            prompt = prompts[i]
            text = prompt if isinstance(prompt, str) else tokenizer.decode(list(prompt))
            scores = _score(reward_fn, i, samples, golds[i])
            rows.extend(_rows(i, text, golds[i], samples, scores))
        done += len(ids)
        if progress is not None:
            progress(done, total)
    return rows


# --------------------------------------------------------------------------- ranks


def _gathered(payload: dict[str, Any], info: DistInfo) -> list[dict[str, Any]]:
    if not info.is_distributed:
        return [payload]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, payload)
    return out


def _raise_first_failure(gathered: list[dict[str, Any]], own: BaseException | None) -> None:
    """Stop every rank when any failed: its own error on the rank that had it, the same
    message (and kind: reward, user or other error) on the others."""
    failures = [(rank, p) for rank, p in enumerate(gathered) if "error" in p]
    if not failures:
        return
    if own is not None:
        raise own
    rank, payload = failures[0]
    kind = {"reward": RewardError, "user": ValueError}.get(payload["kind"], RuntimeError)
    raise kind(f"rank {rank}: {payload['error']}")


def _plan(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    batch_size: int,
) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    """The prompts' token ids and (batch number, prompt indices) of every batch, encoded
    and ordered by `generate`'s own functions, so a share of the batches run through
    `generate` reproduces exactly what one call over all prompts would."""
    vocab_size = model.get_input_embeddings().num_embeddings
    encoded = encode_prompts(tokenizer, prompts, True, vocab_size)
    return encoded, list(enumerate(batch_order([len(ids) for ids in encoded], batch_size)))


def evaluate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    golds: Sequence[str],
    reward_fn: RewardFn,
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    info: DistInfo | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Generate `n` answers per prompt, score each against its gold answer, summarise.

    Prompts are strings (tokenized with the tokenizer's special tokens) or token-id lists
    used as given (e.g. from `posttrain.generation.prompts.chat_prompt_ids`); `golds[i]` is the
    ground truth `reward_fn(response, gold)` gets for prompt i. Generation settings are
    those of `posttrain.generation.decode.generate` (temperature 0: greedy, then `n` must be 1).

    With `info.is_distributed`, every rank must call this with the same arguments: each
    generates and scores its share of the batches, the rows are all-gathered, and every
    rank returns the same result, identical to one process's. A model wrapped in DDP is
    unwrapped; an FSDP-sharded model is refused (ranks would run different numbers of
    forwards, each a collective). `progress(done, total)` is called with this rank's
    prompt counts, first (0, total), then after each batch.

    Raises ValueError for bad inputs (on every rank alike), RewardError (a ValueError)
    naming the prompt when the reward function fails; under torch.distributed a failure
    on one rank is raised on all of them.
    """
    _check_inputs(prompts, golds, reward_fn, n, temperature, top_p, max_new_tokens, batch_size)
    info = info or DistInfo(0, 1, 0, next(model.parameters()).device)
    model = unwrap_model(model)
    if info.is_distributed and is_fsdp(model):
        raise ValueError(
            "evaluate_answers cannot generate with an FSDP-sharded model: gather it into a "
            "whole model on each rank first"
        )
    start = time.perf_counter()
    encoded, plan = _plan(model, tokenizer, prompts, batch_size)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        stop_token_ids=stop_token_ids,
        batch_size=batch_size,
    )
    share = plan[info.rank :: info.world_size]
    own: BaseException | None = None
    try:
        rows = _run_share(
            model, tokenizer, prompts, golds, reward_fn, share, encoded, seed, kwargs, progress
        )
        payload: dict[str, Any] = {"rows": rows, "seconds": time.perf_counter() - start}
    except Exception as exc:
        if not info.is_distributed:
            raise
        own = exc
        if isinstance(exc, RewardError):
            kind = "reward"
        else:
            kind = "user" if isinstance(exc, ValueError) else "other"
        payload = {"error": f"{type(exc).__name__}: {exc}", "kind": kind}
    gathered = _gathered(payload, info)
    _raise_first_failure(gathered, own)
    samples = sorted(
        (row for p in gathered for row in p["rows"]), key=lambda r: (r["index"], r["sample"])
    )
    # The slowest rank's time: the same number on every rank.
    seconds = max(p["seconds"] for p in gathered)
    return EvalResult(summarize_samples(samples, n, seconds), samples)


# --------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def summarize_samples(
    samples: Sequence[Mapping[str, Any]], n: int, seconds: float
) -> dict[str, float | int]:
    """The summary of scored sample rows (the `samples` of an `EvalResult`).

    accuracy / format_rate / answer_accuracy: means of reward / format_reward /
    answer_reward over all samples. With n > 1, pass@n: the fraction of prompts with at
    least one correct sample (answer_reward >= 1), and mean@n: the mean over prompts of
    their mean reward. mean_response_length (tokens) over all samples, and over correct /
    incorrect ones (each present only when there is such a sample); truncated_fraction:
    samples cut by max_new_tokens; mean_entropy: mean over samples of each one's mean
    per-token entropy (nats); then counts, generated tokens, seconds and tokens per second.
    """
    if not samples:
        raise ValueError("no samples to summarise")
    by_prompt: dict[int, list[Mapping[str, Any]]] = {}
    for row in samples:
        by_prompt.setdefault(row["index"], []).append(row)
    correct = [r for r in samples if r["answer_reward"] >= CORRECT_AT]
    wrong = [r for r in samples if r["answer_reward"] < CORRECT_AT]
    summary: dict[str, float | int] = {
        "accuracy": _mean([r["reward"] for r in samples]),
        "format_rate": _mean([r["format_reward"] for r in samples]),
        "answer_accuracy": _mean([r["answer_reward"] for r in samples]),
    }
    if n > 1:
        groups = list(by_prompt.values())
        summary[f"pass@{n}"] = _mean(
            [float(any(r["answer_reward"] >= CORRECT_AT for r in g)) for g in groups]
        )
        summary[f"mean@{n}"] = _mean([_mean([r["reward"] for r in g]) for g in groups])
    summary["mean_response_length"] = _mean([r["num_tokens"] for r in samples])
    if correct:
        summary["mean_response_length_correct"] = _mean([r["num_tokens"] for r in correct])
    if wrong:
        summary["mean_response_length_incorrect"] = _mean([r["num_tokens"] for r in wrong])
    tokens = sum(int(r["num_tokens"]) for r in samples)
    summary.update(
        truncated_fraction=_mean([float(r["truncated"]) for r in samples]),
        mean_entropy=_mean([r["mean_entropy"] for r in samples]),
        num_prompts=len(by_prompt),
        num_samples=len(samples),
        n=n,
        generated_tokens=tokens,
        seconds=float(seconds),
        generated_tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
    )
    return summary


def write_generations(path: str | os.PathLike[str], samples: Sequence[Mapping[str, Any]]) -> Path:
    """Write sample rows as JSON Lines, one object per sample; returns the path."""
    return write_jsonl(path, samples)


# Timing and counts rather than scores: shown as plain numbers.
_PLAIN_KEYS = ("num_prompts", "num_samples", "n", "generated_tokens")


def format_value(key: str, value: float | int) -> str:
    """A summary value as the table shows it: counts whole, seconds to 0.1, rest to 4 places."""
    if key in _PLAIN_KEYS or isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if key == "seconds":
        return f"{value:.1f}"
    if key.endswith("_per_s") or key.startswith("mean_response_length"):
        return f"{value:,.1f}"
    return f"{value:.4f}"


def format_summary_table(summary: Mapping[str, float | int]) -> str:
    """The summary as an aligned two-column text table, one metric per line."""
    width = max((len(key) for key in summary), default=0)
    return "\n".join(f"{key:<{width}}  {format_value(key, v)}" for key, v in summary.items())
