"""Expert iteration as a method on the engine (CS336 assignment 5, Algorithm 2).

Each step samples `group_size` responses to a batch of questions (the rollouts of
`posttrain grpo`, seeded alike), keeps the correct ones (reward >= 1, each distinct
response once), and fine-tunes on them for `sft_epochs` passes with the SFT objective
(response-token NLL, one mean over the tokens of each optimizer step of
`train_batch_size` kept responses). The kept responses of each step are saved.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Tensor

from posttrain.config.grpo import ExpertIterationConfig
from posttrain.engine.run import Run
from posttrain.grpo.base import (
    ROLLOUT_BREAKS_EXACT_RESUME,
    ROLLOUT_METRICS,
    RolloutMethod,
    write_step_rollouts,
)
from posttrain.losses.nll import token_weighted_nll_objective
from posttrain.losses.policy_gradient import micro_batches
from posttrain.rollouts.sampling import Rollout, rollout_statistics

logger = logging.getLogger("posttrain")

KEPT_DIR = "kept"
CORRECT_AT = 1.0
# Settings whose change on resume makes the run differ from an uninterrupted one.
EI_BREAKS_EXACT_RESUME = (*ROLLOUT_BREAKS_EXACT_RESUME, "sft_epochs")


def keep_correct(rollouts: Sequence[Rollout]) -> list[Rollout]:
    """The rollouts whose reward reaches 1, each distinct (question, response) once, in
    rollout order."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    kept = []
    for rollout in rollouts:
        key = (rollout.question, tuple(rollout.response_ids))
        if rollout.reward >= CORRECT_AT and key not in seen:
            seen.add(key)
            kept.append(rollout)
    return kept


class ExpertIteration(RolloutMethod):
    """Sample, keep what is correct, fine-tune on it (`posttrain expert-iteration`)."""

    command = "expert-iteration"
    breaks_exact_resume = EI_BREAKS_EXACT_RESUME
    metrics: ClassVar[Mapping[str, str]] = {
        **ROLLOUT_METRICS,
        "kept": "responses kept for fine-tuning: reward 1, each distinct one once",
        "kept_fraction": "kept / rollouts of the step",
        "loss": "mean response-token NLL on the kept responses, over the step's updates "
        "(NaN when none was kept)",
        "grad_norm": "gradient norm before clipping, mean over the step's updates (0 when "
        "none was kept)",
    }

    def __init__(self, config: ExpertIterationConfig) -> None:
        super().__init__(config)
        self.config: ExpertIterationConfig = config
        # The schedule spans the most updates a step can take (every response kept); a
        # step that keeps fewer takes fewer, and the learning rate decays less.
        self.updates_per_step = config.sft_epochs * math.ceil(
            config.rollout_batch_size / config.train_batch_size
        )

    def log_plan(self, run: Run) -> None:
        c = self.config
        logger.info(
            "%d questions of %s; per step %d questions x %d responses, the correct ones "
            "fine-tuned on for %d epoch(s) in optimizer steps of up to %d, %d steps",
            len(self._questions()),
            c.train_file,
            c.rollout_batch_size // c.group_size,
            c.group_size,
            c.sft_epochs,
            c.train_batch_size,
            run.total_steps,
        )

    def step(self, run: Run, step: int) -> dict[str, float]:
        rollouts, rollout_seconds = self._rollouts(run, step)
        kept = keep_correct(rollouts)
        write_step_rollouts(run, KEPT_DIR, step, kept)
        row = rollout_statistics(rollouts, self.config.group_size)
        started = time.monotonic()
        losses, norms = [], []
        # Logged as the other methods log it: the rate of the step's last update (with
        # nothing kept, no update: the rate the next one will use).
        lr = run.scheduler.get_last_lr()[0]
        objective = token_weighted_nll_objective()
        for _ in range(self.config.sft_epochs):
            for start in range(0, len(kept), self.config.train_batch_size):
                part = kept[start : start + self.config.train_batch_size]
                batches = self._micro_batches(run, part)
                total = run.accumulate(batches, objective).all_reduced(run.info)
                grad_norm, lr = run.optimizer_step(total["loss"], step + 1)
                losses.append(total["loss"])
                norms.append(grad_norm)
        tokens = sum(len(r.response_ids) for r in rollouts)
        row.update(
            kept=float(len(kept)),
            kept_fraction=len(kept) / len(rollouts),
            loss=sum(losses) / len(losses) if losses else float("nan"),
            grad_norm=sum(norms) / len(norms) if norms else 0.0,
            lr=lr,
            rollout_seconds=rollout_seconds,
            train_seconds=time.monotonic() - started,
            rollout_tokens_per_s=tokens / max(rollout_seconds, 1e-9),
        )
        return row

    def _micro_batches(self, run: Run, part: Sequence[Rollout]) -> list[dict[str, Tensor]]:
        """This rank's micro-batches of one optimizer step. Every rank runs as many: a
        rank short of responses pads with a copy of the first at weight 0 (a forward and
        backward that change nothing, which DDP's and FSDP's collectives need)."""
        info = run.info
        weight = 1.0 / max(sum(len(r.response_ids) for r in part), 1)
        per_rank = math.ceil(len(part) / info.world_size)
        mine = list(part[info.rank * per_rank : (info.rank + 1) * per_rank])
        weights = [weight] * len(mine) + [0.0] * (per_rank - len(mine))
        mine += [part[0]] * (per_rank - len(mine))
        return micro_batches(mine, weights, run.pad_id, self.config.micro_batch_size, info.device)
