"""GRPO's objective: the policy-gradient loss of CS336's functions, normalised exactly.

Every rank holds the whole rollout batch, so the normaliser of an optimizer step is known
without a collective, and each response's tokens get a weight such that the step's loss
is the same sum however the step is split into micro-batches and ranks:

- sequence: 1 / (its response tokens x rollouts in the step): each response's token
  mean, averaged over responses (the upstream `grpo_microbatch_train_step`);
- constant: 1 / (max_new_tokens x rollouts in the step): token sums over a constant
  length, averaged (Dr. GRPO);
- token: 1 / (response tokens of every rollout in the step): one mean over all tokens
  (DAPO).

With `beta > 0` the per-token KL estimate to the reference is added with the same
weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.common.devices import to_device
from posttrain.models.policy import Objective, batch_log_probs
from posttrain.primitives import build_rollout_batch
from posttrain.rl import compute_policy_gradient_loss, kl_penalty
from posttrain.rollouts.sampling import Rollout


@dataclass(frozen=True)
class Loss:
    """The loss settings (plain values from the run's config)."""

    loss_type: str
    length_normalization: str
    max_new_tokens: int
    cliprange: float
    beta: float
    kl_estimator: str


def token_weights(
    step_rollouts: Sequence[Rollout], normalization: str, max_new_tokens: int
) -> list[float]:
    """The per-token loss weight of each rollout of one optimizer step (all ranks')."""
    lengths = [len(r.response_ids) for r in step_rollouts]
    n = len(step_rollouts)
    if normalization == "sequence":
        return [1.0 / (max(length, 1) * n) for length in lengths]
    if normalization == "constant":
        return [1.0 / (max_new_tokens * n)] * n
    if normalization == "token":
        return [1.0 / max(sum(lengths), 1)] * n
    raise ValueError(f"unknown length_normalization {normalization!r}")


def micro_batches(
    step_rollouts: Sequence[Rollout],
    weights: Sequence[float],
    pad_id: int,
    micro_batch_size: int,
    device: torch.device,
) -> list[dict[str, Tensor]]:
    """The training micro-batches of some rollouts, on `device`: input_ids, labels,
    attention_mask (batch, seq) int64; response_mask and token_weights (batch, seq)
    float32; advantages and raw_rewards (batch,) float32. The response tokens are the
    sampled ids exactly (`build_rollout_batch`)."""
    batches = []
    for start in range(0, len(step_rollouts), micro_batch_size):
        part = step_rollouts[start : start + micro_batch_size]
        batch = build_rollout_batch(
            [r.prompt_ids for r in part], [r.response_ids for r in part], pad_id
        )
        lengths = torch.tensor([len(r.prompt_ids) + len(r.response_ids) - 1 for r in part])
        positions = torch.arange(batch["input_ids"].shape[1])
        batch["attention_mask"] = (positions[None, :] < lengths[:, None]).long()
        w = torch.tensor(weights[start : start + micro_batch_size], dtype=torch.float32)
        batch["token_weights"] = batch["response_mask"] * w[:, None]
        batch["advantages"] = torch.tensor([r.advantage for r in part], dtype=torch.float32)
        batch["raw_rewards"] = torch.tensor([r.reward for r in part], dtype=torch.float32)
        batches.append(to_device(batch, device))
    return batches


def policy_gradient_objective(loss: Loss) -> Objective:
    """The engine objective of a GRPO update: a micro-batch's share of the step's loss
    (policy gradient, plus beta x KL) and its statistics."""

    def objective(module: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        out = batch_log_probs(module, batch)
        log_probs = out["log_probs"]
        per_token, meta = compute_policy_gradient_loss(
            log_probs,
            loss.loss_type,  # type: ignore[arg-type]
            raw_rewards=batch["raw_rewards"],
            advantages=batch["advantages"],
            # On-policy with one update per rollout batch the sampling policy is this one.
            old_log_probs=batch.get("old_log_probs", log_probs.detach()),
            cliprange=loss.cliprange,
        )
        mask = batch["response_mask"]
        statistics: dict[str, Any] = {"num_response_tokens": mask.sum()}
        if "clipped" in meta:
            statistics["clipped_tokens"] = (meta["clipped"] * mask).sum()
        if loss.beta > 0:
            kl = kl_penalty(log_probs, batch["ref_log_probs"], loss.kl_estimator)  # type: ignore[arg-type]
            per_token = per_token + loss.beta * kl
            statistics["kl_sum"] = (kl.detach() * mask).sum()
        return (per_token * batch["token_weights"]).sum(), statistics

    return objective
