"""GRPO as a method on the engine (CS336 assignment 5, Algorithm 3).

One step is one rollout batch: sample `group_size` responses to each of the step's
questions, score them, compute group-normalised advantages, then make
`epochs_per_rollout_batch` passes over the rollouts in optimizer steps of
`train_batch_size` rollouts (`updates_per_step` updates in all). The sampling policy's
log-probs are computed once per rollout batch when an update can be off-policy (several
passes, or several optimizer steps under grpo_clip), and the reference's when
`beta > 0`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Tensor

from posttrain.config.grpo import GRPOConfig
from posttrain.engine.run import Run
from posttrain.grpo.base import ROLLOUT_BREAKS_EXACT_RESUME, ROLLOUT_METRICS, RolloutMethod
from posttrain.losses.policy_gradient import (
    Loss,
    micro_batches,
    policy_gradient_objective,
    token_weights,
)
from posttrain.rollouts.sampling import (
    Rollout,
    rollout_statistics,
)

logger = logging.getLogger("posttrain")

# GRPO settings whose change on resume makes the run differ from an uninterrupted one.
GRPO_BREAKS_EXACT_RESUME = (
    *ROLLOUT_BREAKS_EXACT_RESUME,
    "epochs_per_rollout_batch",
    "loss_type",
    "std_normalization",
    "advantage_eps",
    "cliprange",
    "length_normalization",
    "beta",
    "kl_estimator",
)


class GRPO(RolloutMethod):
    """Group-relative policy optimisation with verifiable rewards (`posttrain grpo`)."""

    command = "grpo"
    breaks_exact_resume = GRPO_BREAKS_EXACT_RESUME
    metrics: ClassVar[Mapping[str, str]] = {
        **ROLLOUT_METRICS,
        "loss": "the policy-gradient loss (loss_type), mean over the step's updates",
        "clip_fraction": "grpo_clip only: share of response tokens whose probability ratio "
        "was clipped",
        "kl": "beta > 0 only: mean per-token KL estimate (kl_estimator) to the starting model",
    }

    def __init__(self, config: GRPOConfig) -> None:
        super().__init__(config)
        self.needs_reference = config.beta > 0
        self.updates_per_step = config.epochs_per_rollout_batch * (
            config.rollout_batch_size // config.train_batch_size
        )
        self.loss = Loss(
            loss_type=config.loss_type,
            length_normalization=config.length_normalization,
            max_new_tokens=config.max_new_tokens,
            cliprange=config.cliprange,
            beta=config.beta,
            kl_estimator=config.kl_estimator,
        )

    def log_plan(self, run: Run) -> None:
        c = self.config
        logger.info(
            "%d questions of %s; per step %d questions x %d responses, %d optimizer "
            "update(s) of %d rollouts (%s loss, %s normalisation%s), %d steps",
            len(self._questions()),
            c.train_file,
            c.rollout_batch_size // c.group_size,
            c.group_size,
            self.updates_per_step,
            c.train_batch_size,
            c.loss_type,
            c.length_normalization,
            f", KL beta {c.beta} ({c.kl_estimator}) to the starting model" if c.beta else "",
            run.total_steps,
        )

    def step(self, run: Run, step: int) -> dict[str, float]:
        rollouts, rollout_seconds = self._rollouts(run, step)
        started = time.monotonic()
        updates = self._updates(run, rollouts)
        row = rollout_statistics(rollouts, self.config.group_size)
        totals = self._train(run, updates, step + 1)
        train_seconds = time.monotonic() - started
        tokens = sum(len(r.response_ids) for r in rollouts)
        row.update(totals)
        row.update(
            rollout_seconds=rollout_seconds,
            train_seconds=train_seconds,
            rollout_tokens_per_s=tokens / max(rollout_seconds, 1e-9),
        )
        return row

    def _updates(self, run: Run, rollouts: Sequence[Rollout]) -> list[list[dict[str, Tensor]]]:
        """Each optimizer step's micro-batches on this rank, with the old policy's and the
        reference's log-probs where the loss needs them."""
        c = self.config
        info = run.info
        per_rank = c.train_batch_size // info.world_size
        updates = []
        for start in range(0, len(rollouts), c.train_batch_size):
            step_rollouts = rollouts[start : start + c.train_batch_size]
            weights = token_weights(step_rollouts, c.length_normalization, c.max_new_tokens)
            mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
            updates.append(
                micro_batches(
                    step_rollouts[mine],
                    weights[mine],
                    run.pad_id,
                    c.micro_batch_size,
                    info.device,
                )
            )
        off_policy = c.epochs_per_rollout_batch > 1 or (
            c.loss_type == "grpo_clip" and len(updates) > 1
        )
        for batch in (b for update in updates for b in update):
            if off_policy:
                batch["old_log_probs"] = run.log_probs(batch)["log_probs"]
            if c.beta > 0:
                batch["ref_log_probs"] = run.reference_log_probs(batch)
        return updates

    def _train(
        self, run: Run, updates: list[list[dict[str, Tensor]]], done: int
    ) -> dict[str, float]:
        objective = policy_gradient_objective(self.loss)
        losses, norms, lr = [], [], 0.0
        clipped = kl = tokens = 0.0
        for _ in range(self.config.epochs_per_rollout_batch):
            for micro in updates:
                total = run.accumulate(micro, objective).all_reduced(run.info)
                grad_norm, lr = run.optimizer_step(total["loss"], done)
                losses.append(total["loss"])
                norms.append(grad_norm)
                tokens += total["num_response_tokens"]
                clipped += total.get("clipped_tokens", 0.0)
                kl += total.get("kl_sum", 0.0)
        row = {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms),
            "lr": lr,
        }
        if self.config.loss_type == "grpo_clip":
            row["clip_fraction"] = clipped / max(tokens, 1.0)
        if self.config.beta > 0:
            row["kl"] = kl / max(tokens, 1.0)
        return row
