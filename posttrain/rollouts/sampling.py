"""Rollouts: sample a group of responses per question, score them, and compare each
response with its group.

A step's questions are cut into generation chunks of `generation_batch_size / group_size`
questions. Chunk c is sampled with a seed from (seed, step, c) alone, as one batch of its
own, so its responses do not depend on the number of ranks, on which rank samples it,
or on any random state: under DDP rank r samples chunks r, r + W, ...; under FSDP every
rank samples every chunk (the sharded layers' all-gathers must stay in step). The
scored rollouts are then gathered, so every rank holds the whole rollout batch in the
same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.common.distributed import DistInfo, all_gather_objects
from posttrain.generation.decode import Sample, generate
from posttrain.rewards import RewardError, RewardFn, score_responses
from posttrain.rl import group_advantages
from posttrain.rollouts.questions import Questions


class RolloutError(RuntimeError):
    """Scoring failed (the reward function raised); the message names the question."""


@dataclass
class Rollout:
    """One sampled response to one question, scored. `response_ids` are the sampled
    token ids as generated, the stop token included."""

    question: int
    prompt_ids: list[int]
    response_ids: list[int]
    response: str
    gold: str
    reward: float
    format_reward: float
    answer_reward: float
    finish_reason: str
    truncated: bool
    mean_entropy: float
    advantage: float = 0.0


@dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled and scored (plain values from the run's config)."""

    group_size: int
    temperature: float
    top_p: float
    max_new_tokens: int
    generation_batch_size: int
    seed: int
    advantage_eps: float
    std_normalization: bool


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The sampling seed of generation chunk `chunk` of step `step`: a function of the
    run's seed, the step and the chunk alone."""
    digest = hashlib.sha256(f"posttrain-rollout:{seed}:{step}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _sample_chunk(
    model: nn.Module,
    tokenizer: Any,
    questions: Questions,
    chunk: Sequence[int],
    sampling: Sampling,
    seed: int,
    reward_fn: RewardFn,
) -> list[Rollout]:
    groups: list[list[Sample]] = generate(
        model,
        tokenizer,
        [questions.prompt_ids[q] for q in chunk],
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        n=sampling.group_size,
        seed=seed,
        stop=questions.stop,
        stop_token_ids=questions.stop_token_ids,
        batch_size=len(chunk),
    )
    rollouts = []
    for q, samples in zip(chunk, groups, strict=True):
        try:
            scores = score_responses(
                reward_fn, [s.text for s in samples], [questions.golds[q]] * len(samples)
            )
        except RewardError as error:
            raise RolloutError(f"question {questions.sources[q]}: {error}") from error
        for sample, score in zip(samples, scores, strict=True):
            rollouts.append(
                Rollout(
                    question=q,
                    prompt_ids=questions.prompt_ids[q],
                    response_ids=list(sample.token_ids),
                    response=sample.text,
                    gold=questions.golds[q],
                    reward=score["reward"],
                    format_reward=score["format_reward"],
                    answer_reward=score["answer_reward"],
                    finish_reason=sample.finish_reason,
                    truncated=sample.truncated,
                    mean_entropy=sample.mean_entropy,
                )
            )
    return rollouts


def sample_rollouts(
    model: nn.Module,
    tokenizer: Any,
    questions: Questions,
    chosen: Sequence[int],
    sampling: Sampling,
    step: int,
    reward_fn: RewardFn,
    info: DistInfo,
    every_rank_samples_all: bool,
    status: Callable[[str], None] | None = None,
) -> list[Rollout]:
    """`group_size` scored responses to each question of `chosen`, in that order, with
    group-normalised advantages; the same list on every rank. Every rank must call this.

    Raises RolloutError on every rank when the reward function failed on any of them.
    """
    per_chunk = sampling.generation_batch_size // sampling.group_size
    chunks = [list(chosen[i : i + per_chunk]) for i in range(0, len(chosen), per_chunk)]
    split = info.is_distributed and not every_rank_samples_all
    mine = range(info.rank, len(chunks), info.world_size) if split else range(len(chunks))
    sampled: dict[int, list[Rollout]] = {}
    failure: str | None = None
    for done, c in enumerate(mine):
        try:
            seed = chunk_seed(sampling.seed, step, c)
            sampled[c] = _sample_chunk(
                model, tokenizer, questions, chunks[c], sampling, seed, reward_fn
            )
        except RolloutError as error:
            failure = str(error)
            break
        if status is not None:
            status(f"rollouts: chunk {done + 1}/{len(mine)}")
    if split:
        gathered = all_gather_objects((sampled, failure), info)
        failure = next((f for _, f in gathered if f is not None), None)
        sampled = {c: r for part, _ in gathered for c, r in part.items()}
    if failure is not None:
        raise RolloutError(failure)
    rollouts = [r for c in range(len(chunks)) for r in sampled[c]]
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    advantages, _ = group_advantages(
        rewards, sampling.group_size, sampling.advantage_eps, sampling.std_normalization
    )
    for rollout, advantage in zip(rollouts, advantages.tolist(), strict=True):
        rollout.advantage = advantage
    return rollouts


def rollout_statistics(rollouts: Sequence[Rollout], group_size: int) -> dict[str, float]:
    """The rollout metrics of a step: rewards, the groups with nothing to learn, lengths,
    truncation and the sampling entropy (per token, at temperature 1)."""
    n = len(rollouts)
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    groups = rewards.reshape(-1, group_size)
    tokens = sum(len(r.response_ids) for r in rollouts)
    entropy = sum(r.mean_entropy * len(r.response_ids) for r in rollouts)
    return {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if n > 1 else 0.0,
        "format_reward": sum(r.format_reward for r in rollouts) / n,
        "answer_reward": sum(r.answer_reward for r in rollouts) / n,
        "frac_zero_std_groups": float((groups == groups[:, :1]).all(-1).double().mean()),
        "response_length": tokens / n,
        "truncated_fraction": sum(r.truncated for r in rollouts) / n,
        "entropy": entropy / max(tokens, 1),
    }


def rollout_rows(rollouts: Sequence[Rollout], tokenizer: Any) -> list[dict[str, Any]]:
    """One JSON object per rollout, for rollouts/step_NNNNNN.jsonl."""
    prompts: dict[int, str] = {}
    rows = []
    for r in rollouts:
        if r.question not in prompts:
            prompts[r.question] = tokenizer.decode(r.prompt_ids, skip_special_tokens=False)
        rows.append(
            {
                "question": r.question,
                "prompt": prompts[r.question],
                "response": r.response,
                "gold": r.gold,
                "reward": r.reward,
                "format_reward": r.format_reward,
                "answer_reward": r.answer_reward,
                "advantage": r.advantage,
                "num_tokens": len(r.response_ids),
                "finish_reason": r.finish_reason,
            }
        )
    return rows
