"""Supervised fine-tuning as a method on the engine: data, objective, step, hooks."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from posttrain.common.distributed import DistInfo
from posttrain.config import SFTConfig, config_to_dict
from posttrain.engine.method import Hook, Method
from posttrain.engine.resume import global_batch_change
from posttrain.engine.run import Run
from posttrain.evaluation.hooks import GenerationEvalHook, LossEvalHook, generation_eval_hooks
from posttrain.losses.nll import nll_objective, step_denominator
from posttrain.primitives import pad_token_id_of
from posttrain.sft.data import (
    Batching,
    SFTData,
    load_eval_examples,
    load_training_examples,
    log_data_plan,
)

logger = logging.getLogger("posttrain")

# SFT settings whose change makes a resumed run differ from an uninterrupted one in what
# it trains on or in which order: refused unless resume_with_changes. The batch geometry
# is checked as the global batch (micro x accumulation x ranks), so a run checkpointed
# on N ranks resumes exactly on M with the micro-batch scaled to match.
SFT_BREAKS_EXACT_RESUME = (
    "train_file",
    "group_by_length",
    "max_seq_len",
    "truncation",
    "append_eos",
    "prompt_field",
    "response_field",
    "messages_field",
    "loss_normalization",
)


class SFT(Method):
    """Response-token NLL on prompt/response pairs or chats (`posttrain sft`)."""

    command = "sft"
    breaks_exact_resume = SFT_BREAKS_EXACT_RESUME
    metrics: ClassVar[Mapping[str, str]] = {
        "loss": "mean response-token NLL of the step's batch (loss_normalization sequence: "
        "per sequence, then over sequences)",
        "entropy": "mean next-token entropy over the response tokens (nats)",
        "token_accuracy": "share of response tokens predicted exactly (argmax)",
        "tokens_per_s": "input tokens (padding excluded) per second of the step, all ranks",
        "epoch": "passes over the training data done before this step (fractional)",
    }
    hook_types = (LossEvalHook, GenerationEvalHook)

    def __init__(self, config: SFTConfig) -> None:
        self.config = config
        self.data: SFTData | None = None
        self.eval_examples: list[Any] = []
        self.epoch = 0

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def prepare(self, tokenizer: Any, info: DistInfo) -> int:
        c = self.config
        fmt = c.data_format()
        examples = load_training_examples(c.train_file, tokenizer, fmt, info)
        if c.eval_file:
            self.eval_examples = load_eval_examples(c.eval_file, tokenizer, fmt, c.eval_limit)
        batching = Batching(c.micro_batch_size, c.grad_accum_steps, c.seed, c.group_by_length)
        self.data = SFTData(examples, batching, info, pad_token_id_of(tokenizer))
        return c.max_steps or math.ceil(c.epochs * self.data.steps_per_epoch)

    def _data(self) -> SFTData:
        if self.data is None:
            raise RuntimeError("SFT.prepare has not run")
        return self.data

    def log_plan(self, run: Run) -> None:
        data = self._data()
        log_data_plan(
            data.examples, data.plan(0), run.total_steps, data.batching, run.info.world_size
        )
        c = self.config
        if c.eval_file:
            every = f"every {c.eval_every} steps and at the end" if c.eval_every else "at the end"
            logger.info(
                "evaluation: response-token loss on %d examples of %s, %s",
                len(self.eval_examples),
                c.eval_file,
                every,
            )

    def fingerprint(self) -> str:
        return self._data().fingerprint()

    def resume_problems(
        self, saved_config: Mapping[str, Any], saved_state: Mapping[str, Any], world_size: int
    ) -> list[str]:
        c = self.config
        return global_batch_change(
            saved_config,
            saved_state,
            c.micro_batch_size,
            c.grad_accum_steps,
            world_size,
            "examples",
        )

    def state_dict(self) -> dict[str, Any]:
        # Informational: the data position follows from the step and the seed alone.
        return {"epoch": self.epoch}

    def step(self, run: Run, step: int) -> dict[str, float]:
        started = time.monotonic()
        data = self._data()
        self.epoch = step // data.steps_per_epoch
        batches = data.batches(step)
        normalization = self.config.loss_normalization
        denominator = step_denominator(batches, normalization, run.info)
        sums = run.accumulate(batches, nll_objective(normalization, denominator))
        total = sums.all_reduced(run.info)
        grad_norm, lr = run.optimizer_step(total["loss"], step + 1)
        tokens = max(total["num_tokens"], 1.0)
        return {
            "loss": total["loss"],
            "lr": lr,
            "grad_norm": grad_norm,
            "entropy": total["entropy_sum"] / tokens,
            "token_accuracy": total["num_correct"] / tokens,
            "tokens_per_s": total["num_input_tokens"] / (time.monotonic() - started),
            "epoch": step / data.steps_per_epoch,
        }

    def hooks(self, run: Run) -> list[Hook]:
        c = self.config
        hooks: list[Hook] = []
        if self.eval_examples:
            hooks.append(LossEvalHook(self.eval_examples, c.micro_batch_size, c.eval_every))
        hooks += generation_eval_hooks(c, run.tokenizer, run.out, announce=run.info.is_main)
        return hooks
