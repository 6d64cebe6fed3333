"""Evaluations during training, as hooks the engine runs on their own cadence.

`LossEvalHook`: response-token loss, perplexity and accuracy on held-out examples.
`GenerationEvalHook`: does the model get the answers right? (below)

Every `eval_generate_every` steps and at the end, the model answers the first
`eval_generate_limit` prompts of `eval_generate_file` greedily through the same path as
`posttrain eval` (`answer_eval.evaluate_answers`), each answer is scored with `reward`,
and eval_accuracy, eval_format_rate and eval_mean_response_length are logged; the
samples go to OUTPUT_DIR/generations/step_NNNNNN.jsonl.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from posttrain.common.devices import autocast
from posttrain.common.distributed import DistInfo, is_fsdp, unsharded
from posttrain.data.tokenized import TokenizedExample, end_of_turn_token_ids
from posttrain.evaluation.answers import evaluate_answers, load_eval_data, write_generations
from posttrain.evaluation.held_out_loss import evaluate_loss
from posttrain.generation.prompts import build_prompts
from posttrain.rewards import RewardFn, get_reward_fn

logger = logging.getLogger("posttrain")

GENERATIONS_DIR = "generations"


@dataclass
class GenerationEval:
    """What a run's generation evaluation needs, prepared once before the first step."""

    prompts: list[str] | list[list[int]]
    golds: list[str]
    reward_fn: RewardFn
    stop: tuple[str, ...]
    stop_token_ids: list[int]
    max_new_tokens: int
    out_dir: Path


def prepare_generation_eval(
    path: str,
    tokenizer: Any,
    *,
    prompt_field: str | None,
    answer_field: str | None,
    limit: int | None,
    template: str | None,
    reward: str,
    max_new_tokens: int,
    out_dir: Path,
) -> GenerationEval:
    """Read the prompts and gold answers, render the template, resolve the reward: every
    input error surfaces here, before training starts, a gold answer the reward cannot
    score included. A field left at None follows `posttrain eval`'s rule
    (`answers.eval_field`: `prompt`, else `question`; `answer`, else `response`, else
    `completion`)."""
    reward_fn = get_reward_fn(reward)
    data = load_eval_data(
        path,
        prompt_field,
        answer_field,
        limit=limit,
        flags=("--eval-prompt-field", "--eval-answer-field"),
        reward_fn=reward_fn,
    )
    prompts, stop = build_prompts(tokenizer, data.questions, template or "question_only")
    return GenerationEval(
        prompts=prompts,
        golds=data.golds,
        reward_fn=reward_fn,
        stop=tuple(stop),
        stop_token_ids=end_of_turn_token_ids(tokenizer),
        max_new_tokens=max_new_tokens,
        out_dir=out_dir / GENERATIONS_DIR,
    )


def run_generation_eval(
    spec: GenerationEval,
    model: nn.Module,
    tokenizer: Any,
    loss_module: nn.Module,
    info: DistInfo,
    step: int,
    autocast_dtype: torch.dtype | None,
    status: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Greedy answers to every prompt, scored; returns the metrics line and writes the
    samples (rank 0). Every rank must call this.

    Under DDP the prompts are split over the ranks and the results gathered. Under FSDP
    every rank answers every prompt (identical inputs and weights give identical
    decoding steps, so the per-layer all-gathers stay in step across ranks).
    """
    sharded = is_fsdp(loss_module)
    was_training = model.training
    model.eval()

    def report(done: int, total: int) -> None:
        if status is not None:
            status(f"generate {done}/{total}")

    with unsharded(loss_module), autocast(info.device, autocast_dtype):
        result = evaluate_answers(
            model,
            tokenizer,
            spec.prompts,
            spec.golds,
            spec.reward_fn,
            max_new_tokens=spec.max_new_tokens,
            stop=spec.stop,
            stop_token_ids=spec.stop_token_ids,
            info=None if sharded else info,
            progress=report,
        )
    model.train(was_training)
    if info.is_main:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        write_generations(spec.out_dir / f"step_{step:06d}.jsonl", result.samples)
    summary = result.summary
    return {
        "eval_accuracy": float(summary["accuracy"]),
        "eval_format_rate": float(summary["format_rate"]),
        "eval_mean_response_length": float(summary["mean_response_length"]),
    }


class HookRun(Protocol):
    """What a hook reads of the engine's `Run`."""

    info: DistInfo
    model: nn.Module
    tokenizer: Any
    pad_id: int
    policy: Any
    module: nn.Module
    autocast_dtype: torch.dtype | None


@dataclass
class LossEvalHook:
    """Held-out response-token loss (`held_out_loss.evaluate_loss`) every `every` steps
    and at the end."""

    examples: list[TokenizedExample]
    micro_batch_size: int
    every: int

    # The keys it logs (`held_out_loss.evaluate_loss`) -> what each means.
    metrics: ClassVar[Mapping[str, str]] = {
        "eval_loss": "mean response-token NLL on the held-out examples",
        "eval_perplexity": "exp(eval_loss)",
        "eval_entropy": "mean next-token entropy over the held-out response tokens (nats)",
        "eval_token_accuracy": "share of held-out response tokens predicted exactly (argmax)",
    }

    def __call__(self, run: HookRun, done: int, status: Callable[[str], None]) -> dict[str, float]:
        return evaluate_loss(
            run.module,
            self.examples,
            self.micro_batch_size,
            run.pad_id,
            run.info,
            run.autocast_dtype,
            on_batch=status,
        )


@dataclass
class GenerationEvalHook:
    """Greedy answers to held-out prompts, scored (`run_generation_eval`), every `every`
    steps and at the end."""

    spec: GenerationEval
    every: int

    # The keys it logs (`run_generation_eval`) -> what each means.
    metrics: ClassVar[Mapping[str, str]] = {
        "eval_accuracy": "mean reward of the greedy answers (the share right, for a 0/1 reward)",
        "eval_format_rate": "mean format reward: the share of answers in the expected form",
        "eval_mean_response_length": "mean answer length in tokens",
    }

    def __call__(self, run: HookRun, done: int, status: Callable[[str], None]) -> dict[str, float]:
        # Generation's caches need the memory more than the next step needs to skip the
        # page faults of fresh loss buffers.
        run.policy.release_buffers()
        return run_generation_eval(
            self.spec,
            run.model,
            run.tokenizer,
            run.module,
            run.info,
            done,
            run.autocast_dtype,
            status,
        )


class GenerationEvalSettings(Protocol):
    """What `generation_eval_hooks` reads of a training command's config (the settings
    every command shares, `TrainConfig`'s eval_generate_* and reward)."""

    eval_generate_file: str | None
    eval_generate_every: int
    eval_generate_limit: int | None
    eval_max_new_tokens: int
    reward: str | None
    eval_prompt_field: str | None
    eval_answer_field: str | None
    eval_prompt_template: str | None


def generation_eval_hooks(
    settings: GenerationEvalSettings,
    tokenizer: Any,
    out_dir: Path,
    *,
    announce: bool,
    template: str | None = None,
) -> list[GenerationEvalHook]:
    """The generation evaluation a training command's settings ask for: [] without an
    `eval_generate_file`, else one hook, prepared before the first step (every input
    error surfaces now) and, with `announce`, said in the log.

    `template`: the prompt template (default: `eval_prompt_template`; None: question_only).
    A field left at None follows `posttrain eval`'s rule (question from prompt, else
    question; gold from answer, else response, else completion)."""
    path = settings.eval_generate_file
    if path is None:
        return []
    if not settings.reward:  # the configs refuse this; a config built otherwise too
        raise ValueError("eval_generate_file is set but no reward to score the answers with")
    every = settings.eval_generate_every
    spec = prepare_generation_eval(
        path,
        tokenizer,
        prompt_field=settings.eval_prompt_field,
        answer_field=settings.eval_answer_field,
        limit=settings.eval_generate_limit,
        template=settings.eval_prompt_template if template is None else template,
        reward=settings.reward,
        max_new_tokens=settings.eval_max_new_tokens,
        out_dir=out_dir,
    )
    if announce:
        logger.info(
            "generation evaluation: greedy answers to %d prompts of %s scored with %r, %s",
            len(spec.prompts),
            path,
            settings.reward,
            f"every {every} steps and at the end" if every else "at the end",
        )
    return [GenerationEvalHook(spec, every)]
