"""What the rollout methods (GRPO, expert iteration) share: their questions, how they
sample and score rollouts each step, the rollouts written per step, the data fingerprint
and the generation evaluation."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar

from posttrain.common.devices import autocast
from posttrain.common.distributed import DistInfo, is_fsdp, unsharded
from posttrain.common.jsonl import write_jsonl
from posttrain.config.grpo import GRPOConfig, check_world_size
from posttrain.engine.method import Hook, Method
from posttrain.engine.resume import data_fingerprint
from posttrain.engine.run import Run, StopBeforeStep
from posttrain.evaluation.hooks import GenerationEvalHook, generation_eval_hooks
from posttrain.rewards import get_reward_fn
from posttrain.rollouts.questions import Questions, load_questions
from posttrain.rollouts.sampling import (
    Rollout,
    RolloutError,
    Sampling,
    rollout_rows,
    sample_rollouts,
)

logger = logging.getLogger("posttrain")

ROLLOUTS_DIR = "rollouts"
# Settings of the questions and the sampling whose change on resume makes a rollout
# method's run differ from an uninterrupted one.
ROLLOUT_BREAKS_EXACT_RESUME = (
    "train_file",
    "reward",
    "prompt_field",
    "answer_field",
    "prompt_template",
    "chat",
    "rollout_batch_size",
    "group_size",
    "temperature",
    "top_p",
    "max_new_tokens",
    "generation_batch_size",
    "train_batch_size",
)


def write_step_rollouts(run: Run, directory: str, step: int, rollouts: list[Rollout]) -> None:
    """OUTPUT_DIR/`directory`/step_NNNNNN.jsonl (step counted from 1): one row per rollout,
    written by rank 0."""
    if run.info.is_main:
        path = run.out / directory / f"step_{step + 1:06d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, rollout_rows(rollouts, run.tokenizer))


# The keys of a rollout method's step about its rollouts and timing (`rollout_statistics`,
# then the step's own) -> what each means.
ROLLOUT_METRICS: dict[str, str] = {
    "reward": "mean reward of the step's rollouts",
    "reward_std": "standard deviation of those rewards",
    "format_reward": "mean format reward: the share of responses in the expected form",
    "answer_reward": "mean answer reward: the share of right answers",
    "frac_zero_std_groups": "share of questions whose responses all got the same reward "
    "(nothing to learn from them)",
    "response_length": "mean response length in tokens",
    "truncated_fraction": "share of responses cut at max_new_tokens",
    "entropy": "mean per-token entropy of the sampling distribution (at temperature 1, nats)",
    "rollout_seconds": "seconds spent sampling and scoring the rollouts",
    "train_seconds": "seconds spent on the updates",
    "rollout_tokens_per_s": "response tokens sampled per second, all ranks",
}


class RolloutMethod(Method):
    """A method whose step starts by sampling and scoring a rollout batch."""

    metrics: ClassVar[Mapping[str, str]] = ROLLOUT_METRICS
    hook_types = (GenerationEvalHook,)

    def __init__(self, config: GRPOConfig) -> None:
        self.config = config
        self.reward_fn = get_reward_fn(config.reward or "")
        self.questions: Questions | None = None
        self.sampling = Sampling(
            group_size=config.group_size,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            generation_batch_size=config.generation_batch_size,
            seed=config.seed,
            advantage_eps=config.advantage_eps,
            std_normalization=config.std_normalization,
        )

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def prepare(self, tokenizer: Any, info: DistInfo) -> int:
        c = self.config
        check_world_size(c, info.world_size)
        self.questions = load_questions(
            c.train_file,
            tokenizer,
            prompt_field=c.prompt_field,
            answer_field=c.answer_field,
            template=c.prompt_template,
            chat=c.chat,
            reward_fn=self.reward_fn,
            vocab_size=len(tokenizer),
        )
        return int(c.max_steps or 0)

    def _questions(self) -> Questions:
        if self.questions is None:
            raise RuntimeError(f"{type(self).__name__}.prepare has not run")
        return self.questions

    def fingerprint(self) -> str:
        questions = self._questions()
        return data_fingerprint(questions.prompt_ids)

    def _rollouts(self, run: Run, step: int) -> tuple[list[Rollout], float]:
        c = self.config
        questions = self._questions()
        chosen = questions.for_step(c.seed, step, c.rollout_batch_size // c.group_size)
        started = time.monotonic()
        # Generation's caches need the memory more than the next update needs to skip
        # the page faults of fresh loss buffers.
        run.policy.release_buffers()
        sharded = is_fsdp(run.module)
        try:
            with unsharded(run.module), autocast(run.info.device, run.autocast_dtype):
                rollouts = sample_rollouts(
                    run.model,
                    run.tokenizer,
                    questions,
                    chosen,
                    self.sampling,
                    step,
                    self.reward_fn,
                    run.info,
                    every_rank_samples_all=sharded,
                )
        except RolloutError as error:
            raise StopBeforeStep(str(error)) from error
        seconds = time.monotonic() - started
        write_step_rollouts(run, ROLLOUTS_DIR, step, rollouts)
        return rollouts, seconds

    def hooks(self, run: Run) -> list[Hook]:
        c = self.config
        # Without an eval template the evaluation prompts as training does.
        return generation_eval_hooks(
            c,
            run.tokenizer,
            run.out,
            announce=run.info.is_main,
            template=c.eval_prompt_template or c.prompt_template,
        )
