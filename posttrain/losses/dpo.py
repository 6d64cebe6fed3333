"""Direct Preference Optimization (Rafailov et al. 2023): the loss, CS336's per-instance
function, and the engine objective of `posttrain dpo`.

A micro-batch holds whole pairs: its first half of rows are the chosen responses, its
second half the rejected ones, pair i in rows i and i + pairs. One forward scores both;
each response's log-prob is the sum over its trained tokens (the prompt cancels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posttrain.models.policy import Objective, batch_log_probs
from posttrain.primitives import get_response_log_probs

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}"
)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and the implicit rewards of both responses.

    All inputs (pairs,) float: sequence log-probs (for `ipo`, pass length-normalised ones,
    the mean over each response's tokens, as IPO requires). With h = (policy_chosen -
    ref_chosen) - (policy_rejected - ref_rejected):
    sigmoid: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h) (conservative DPO with
    label smoothing ls); ipo: (h - 1 / (2 beta))^2; hinge: relu(1 - beta h).

    Returns (losses, chosen_rewards, rejected_rewards), each (pairs,) float32, the rewards
    beta x (policy - reference) log-probs, detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def compute_per_instance_dpo_loss(
    lm: nn.Module,
    lm_ref: nn.Module,
    tokenizer: Any,
    beta: float,
    prompt: str,
    response_chosen: str,
    response_rejected: str,
) -> Tensor:
    """The DPO loss of one preference pair (CS336 assignment 5 supplement), a 0-dim float32
    tensor on `lm`'s device with gradients to `lm` only.

    The prompt and each response are formatted with the Alpaca template (`ALPACA_TEMPLATE`)
    and tokenized whole, the EOS token is appended, and each sequence's log-prob is the
    sum of all its token log-probs (the prompt's cancel in the difference). `lm_ref` may
    be on another device.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end the responses with")

    def sequence_logp(model: nn.Module, response: str) -> Tensor:
        text = ALPACA_TEMPLATE.format(instruction=prompt, response=response)
        ids = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
        device = next(model.parameters()).device
        tokens = torch.tensor([ids], device=device)
        out = get_response_log_probs(model, tokens[:, :-1], tokens[:, 1:])
        return out["log_probs"].sum()

    chosen, rejected = sequence_logp(lm, response_chosen), sequence_logp(lm, response_rejected)
    with torch.no_grad():
        ref = torch.stack(
            [sequence_logp(lm_ref, response_chosen), sequence_logp(lm_ref, response_rejected)]
        ).to(chosen.device)
    loss, _, _ = dpo_loss(chosen[None], rejected[None], ref[0:1], ref[1:2], beta)
    return loss[0]


@dataclass(frozen=True)
class DPOLoss:
    """The DPO settings (plain values from the run's config)."""

    beta: float
    loss_type: str
    label_smoothing: float


def dpo_objective(loss: DPOLoss, pairs_in_step: int) -> Objective:
    """The engine objective of a DPO step: a micro-batch of whole pairs (chosen rows, then
    rejected rows, with `ref_logps` (2 x pairs,) float32 and `pair_weights` (pairs,)
    float32, 0 for a padding pair) gives its share of the mean loss over the
    `pairs_in_step` pairs of the optimizer step, and its statistics."""

    def objective(module: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        out = batch_log_probs(module, batch)
        mask = batch["response_mask"]
        logps = (out["log_probs"] * mask).sum(-1)
        if loss.loss_type == "ipo":
            logps = logps / mask.sum(-1).clamp(min=1)
        half = logps.shape[0] // 2
        ref = batch["ref_logps"]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:half],
            logps[half:],
            ref[:half],
            ref[half:],
            loss.beta,
            loss.loss_type,
            loss.label_smoothing,  # type: ignore[arg-type]
        )
        weights = batch["pair_weights"]
        statistics = {
            "pairs": weights.sum(),
            "rewards_chosen": (chosen_rewards * weights).sum(),
            "rewards_rejected": (rejected_rewards * weights).sum(),
            "reward_accuracy": ((chosen_rewards > rejected_rewards).float() * weights).sum(),
            "logps_chosen": (logps[:half].detach() * weights).sum(),
            "logps_rejected": (logps[half:].detach() * weights).sum(),
            "num_input_tokens": batch["attention_mask"].sum(),
        }
        return (losses * weights).sum() / pairs_in_step, statistics

    return objective


def dpo_metrics(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Per-pair means from summed `dpo_objective` statistics (loss: already the mean)."""
    pairs = max(totals["pairs"], 1.0)
    chosen, rejected = totals["rewards_chosen"] / pairs, totals["rewards_rejected"] / pairs
    return {
        f"{prefix}loss": totals["loss"],
        f"{prefix}rewards_chosen": chosen,
        f"{prefix}rewards_rejected": rejected,
        f"{prefix}reward_margin": chosen - rejected,
        f"{prefix}reward_accuracy": totals["reward_accuracy"] / pairs,
        f"{prefix}logps_chosen": totals["logps_chosen"] / pairs,
        f"{prefix}logps_rejected": totals["logps_rejected"] / pairs,
    }
