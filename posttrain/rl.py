"""Policy-gradient primitives for GRPO-style RL, as pure functions on tensors.

Names, signatures and return values follow Stanford CS336 assignment 5 (GRPO), so code
written against it runs unchanged. Per-token losses are (batch, seq); reduce them with
`grpo_microbatch_train_step` (or `masked_mean` yourself). Losses are computed in float32
for bf16/fp16 inputs (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from posttrain.ops.softmax import compute_dtype
from posttrain.primitives import masked_mean, masked_normalize

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"]
LOSS_TYPES: tuple[str, ...] = ("no_baseline", "reinforce_with_baseline", "grpo_clip")
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float_tensor(name: str, value: Any) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _check_log_probs(name: str, value: Any) -> None:
    _check_float_tensor(name, value)
    if value.ndim != 2:
        raise ValueError(f"{name} must be (batch, seq), got shape {tuple(value.shape)}")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )


def _per_sequence(name: str, values: Any, policy_log_probs: Tensor) -> Tensor:
    """`values` as a (batch, 1) column broadcastable over the sequence; (batch,) accepted."""
    _check_float_tensor(name, values)
    batch = policy_log_probs.shape[0]
    if values.shape == (batch,):
        return values.unsqueeze(-1)
    if values.shape != (batch, 1):
        raise ValueError(
            f"{name} must have shape ({batch}, 1) or ({batch},) to match policy_log_probs "
            f"{tuple(policy_log_probs.shape)}, got {tuple(values.shape)}"
        )
    return values


def _check_cliprange(cliprange: Any) -> float:
    if isinstance(cliprange, Tensor) and cliprange.numel() == 1:
        cliprange = float(cliprange)
    if isinstance(cliprange, bool) or not isinstance(cliprange, (int, float)):
        raise ValueError(f"cliprange must be a number, got {cliprange!r}")
    if not math.isfinite(cliprange) or cliprange < 0:
        raise ValueError(f"cliprange must be finite and >= 0, got {cliprange}")
    return float(cliprange)


# --------------------------------------------------------------------------- rewards


def _reward_dicts(
    reward_fn: Callable[[Any, Any], dict[str, Any]],
    rollout_responses: Sequence[Any],
    repeated_ground_truths: Sequence[Any],
) -> list[dict[str, Any]]:
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    scored = []
    for i, (response, truth) in enumerate(
        zip(rollout_responses, repeated_ground_truths, strict=True)
    ):
        try:
            result = reward_fn(response, truth)
        except Exception as error:
            raise ValueError(f"reward_fn {name} raised on rollout {i}: {error!r}") from error
        if not isinstance(result, dict) or "reward" not in result:
            raise ValueError(
                f"reward_fn {name} must return a dict with key 'reward'; for rollout {i} it "
                f"returned {result!r}"
            )
        scored.append(result)
    return scored


def _as_finite_float(value: Any, what: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be a number, got {value!r}") from error
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}")
    return number


def _sample_std(values: Tensor) -> float:
    """Sample std of a 1-D float64 tensor, 0 for one value; scaled like the group stds."""
    if values.numel() < 2:
        return 0.0
    scale = float(values.abs().max())
    return float((values / scale).std()) * scale if scale > 0 else 0.0


def _check_group_inputs(
    rollout_responses: Sequence[Any],
    repeated_ground_truths: Sequence[Any],
    group_size: int,
    advantage_eps: float,
) -> None:
    _check_int("group_size", group_size, 1)
    for name, values in (
        ("rollout_responses", rollout_responses),
        ("repeated_ground_truths", repeated_ground_truths),
    ):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"{name} must be a list, got {type(values).__name__}")
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(
            f"rollout_responses has {len(rollout_responses)} elements but "
            f"repeated_ground_truths has {len(repeated_ground_truths)}"
        )
    if len(rollout_responses) == 0:
        raise ValueError("rollout_responses and repeated_ground_truths are empty")
    if len(rollout_responses) % group_size != 0:
        raise ValueError(
            f"rollout batch size {len(rollout_responses)} is not a multiple of "
            f"group_size {group_size}"
        )
    eps = _as_finite_float(advantage_eps, "advantage_eps")
    if eps < 0:
        raise ValueError(f"advantage_eps must be >= 0, got {advantage_eps}")


def group_advantages(
    rewards: Tensor, group_size: int, advantage_eps: float, normalize_by_std: bool
) -> tuple[Tensor, Tensor]:
    """Group-normalised advantages of scored rollouts (`compute_group_normalized_rewards`'s
    arithmetic, for rewards already computed).

    rewards: (n,) float64, consecutive groups of `group_size`. Returns (advantages (n,)
    float64, all_equal (n / group_size, 1) bool: the groups with nothing to learn).
    """
    groups = rewards.reshape(-1, group_size)
    all_equal = (groups == groups[:, :1]).all(dim=-1, keepdim=True)
    # Dividing each group by its largest |reward| keeps the squares inside std from
    # underflowing to 0 (tiny rewards) and the result is unchanged for ordinary ones.
    scale = groups.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    scaled = groups / scale
    centred = scaled - scaled.mean(dim=-1, keepdim=True)
    if normalize_by_std and group_size > 1:
        centred = centred / (scaled.std(dim=-1, keepdim=True) + float(advantage_eps) / scale)
    else:
        centred = centred * scale
    # An all-equal group's mean can differ from its members by rounding; force exact zeros.
    return torch.where(all_equal, 0.0, centred).reshape(-1), all_equal


def compute_group_normalized_rewards(
    reward_fn: Callable[[Any, Any], dict[str, Any]],
    rollout_responses: Sequence[Any],
    repeated_ground_truths: Sequence[Any],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Score rollouts and normalise each reward against the other rollouts of its prompt.

    Rollouts form consecutive groups of `group_size` (the samples of one prompt). The
    advantage is reward - group mean, divided by (group std + advantage_eps) when
    `normalize_by_std`; std is the sample std (Bessel's correction, as `torch.std`).
    A group whose rewards are all equal (including any group of size 1, whose sample std
    is undefined) gets advantages of exactly 0: it carries no learning signal.

    Args:
        reward_fn: `reward_fn(response, ground_truth)` -> dict with a finite `reward`
            (and usually `format_reward`, `answer_reward`).
        rollout_responses, repeated_ground_truths: lists of equal length, a multiple of
            `group_size` (each ground truth repeated once per rollout of its prompt).
        group_size: rollouts per prompt, >= 1.
        advantage_eps: non-negative; added to the std to keep the division finite.
        normalize_by_std: divide by the group std (GRPO) or not (Dr. GRPO).

    Returns:
        (advantages, raw_rewards, metadata): two (rollout_batch_size,) float32 tensors and a
        dict of floats: `reward_mean`, `reward_std` (sample std; 0 for one rollout),
        `reward_max`, `reward_min`, `frac_groups_all_equal`, plus `format_reward_mean` and
        `answer_reward_mean` when every reward dict has those keys.

    Raises:
        ValueError: bad sizes, empty or mismatched lists, a reward dict without a finite
            `reward`, or an exception from `reward_fn` (chained, naming the rollout).
    """
    _check_group_inputs(rollout_responses, repeated_ground_truths, group_size, advantage_eps)
    scored = _reward_dicts(reward_fn, rollout_responses, repeated_ground_truths)
    values = [_as_finite_float(d["reward"], f"reward of rollout {i}") for i, d in enumerate(scored)]
    # float64 for the statistics so the float32 result is the correctly rounded one.
    rewards = torch.tensor(values, dtype=torch.float64)
    advantages, all_equal = group_advantages(rewards, group_size, advantage_eps, normalize_by_std)

    metadata = {
        "reward_mean": float(rewards.mean()),
        "reward_std": _sample_std(rewards),
        "reward_max": float(rewards.max()),
        "reward_min": float(rewards.min()),
        "frac_groups_all_equal": float(all_equal.to(torch.float64).mean()),
    }
    for key in ("format_reward", "answer_reward"):
        if all(key in d for d in scored):
            parts = [
                _as_finite_float(d[key], f"{key} of rollout {i}") for i, d in enumerate(scored)
            ]
            metadata[f"{key}_mean"] = math.fsum(parts) / len(parts)
    return advantages.to(torch.float32), rewards.to(torch.float32), metadata


# --------------------------------------------------------------------------- per-token losses


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: Tensor,
    policy_log_probs: Tensor,
) -> Tensor:
    """Per-token REINFORCE loss -A * log p.

    Args:
        raw_rewards_or_advantages: (batch, 1) or (batch,) float, one value per sequence.
        policy_log_probs: (batch, seq) float log-probs of the sampled tokens.

    Returns:
        (batch, seq) per-token loss, float32 (float64 for float64 inputs).
    """
    _check_log_probs("policy_log_probs", policy_log_probs)
    values = _per_sequence("raw_rewards_or_advantages", raw_rewards_or_advantages, policy_log_probs)
    dtype = compute_dtype(values.dtype, policy_log_probs.dtype)
    return -values.to(dtype) * policy_log_probs.to(dtype)


def compute_grpo_clip_loss(
    advantages: Tensor,
    policy_log_probs: Tensor,
    old_log_probs: Tensor,
    cliprange: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO/GRPO clipped loss -min(r A, clip(r, 1 - eps, 1 + eps) A).

    r = exp(log p - log p_old). `old_log_probs` is treated as a constant (detached), as
    the policy that sampled the tokens is: gradients reach `policy_log_probs` only.

    Args:
        advantages: (batch, 1) or (batch,) float.
        policy_log_probs, old_log_probs: (batch, seq) float.
        cliprange: eps >= 0 (0 clips the ratio to exactly 1).

    Returns:
        (per-token loss (batch, seq) float32 (float64 stays), metadata) with `clipped`,
        (batch, seq) bool, True where the clipped term was strictly smaller and so taken,
        and `clip_fraction`, a scalar float tensor: the mean of `clipped` over all tokens.
    """
    _check_log_probs("policy_log_probs", policy_log_probs)
    _check_float_tensor("old_log_probs", old_log_probs)
    _check_same_shape("old_log_probs", old_log_probs, "policy_log_probs", policy_log_probs)
    eps = _check_cliprange(cliprange)
    adv = _per_sequence("advantages", advantages, policy_log_probs)
    dtype = compute_dtype(adv.dtype, policy_log_probs.dtype, old_log_probs.dtype)
    adv = adv.to(dtype)
    ratio = torch.exp(policy_log_probs.to(dtype) - old_log_probs.detach().to(dtype))
    unclipped = ratio * adv
    clipped_term = torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * adv
    loss = -torch.minimum(unclipped, clipped_term)
    clipped = clipped_term < unclipped
    metadata = {"clipped": clipped, "clip_fraction": clipped.to(dtype).mean()}
    return loss, metadata


def compute_policy_gradient_loss(
    policy_log_probs: Tensor,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch to the per-token loss of `loss_type`.

    - `no_baseline`: -raw_rewards * log p (needs `raw_rewards`).
    - `reinforce_with_baseline`: -advantages * log p (needs `advantages`).
    - `grpo_clip`: `compute_grpo_clip_loss` (needs `advantages`, `old_log_probs`,
      `cliprange`).
    Inputs the type does not use are ignored.

    Returns:
        (per-token loss (batch, seq) float32 (float64 stays), metadata dict of tensors;
        empty except for `grpo_clip`).
    """
    required = {
        "no_baseline": {"raw_rewards": raw_rewards},
        "reinforce_with_baseline": {"advantages": advantages},
        "grpo_clip": {
            "advantages": advantages,
            "old_log_probs": old_log_probs,
            "cliprange": cliprange,
        },
    }
    if loss_type not in required:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    missing = [name for name, value in required[loss_type].items() if value is None]
    if missing:
        raise ValueError(f"loss_type {loss_type!r} requires {', '.join(missing)}")
    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)


# --------------------------------------------------------------------------- training step


def grpo_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    normalize_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward the policy-gradient loss of one micro-batch, scaled for accumulation.

    Each sequence's loss is the mean of its per-token loss over its response tokens
    (a sequence with no response token contributes 0 loss and 0 gradient); or, with
    `normalize_constant` (Dr. GRPO), the masked sum divided by that constant. The loss is
    the batch mean of those, divided by `gradient_accumulation_steps`; `backward()` is
    called on it.

    Args:
        policy_log_probs: (batch, seq) float, requiring grad. response_mask: (batch, seq)
            bool/int/float, non-zero on response tokens.
        gradient_accumulation_steps: micro-batches per optimizer step, int >= 1.
        loss_type, raw_rewards, advantages, old_log_probs, cliprange: as for
            `compute_policy_gradient_loss`.
        normalize_constant: None for the per-sequence mean, else a positive finite number.

    Returns:
        (scaled loss, metadata), all detached. metadata holds `scaled_loss`,
        `unscaled_loss`, `num_response_tokens`, and for `grpo_clip` `clip_fraction` (the
        fraction of response tokens clipped) and `clipped` (per token).
    """
    _check_int("gradient_accumulation_steps", gradient_accumulation_steps, 1)
    _check_log_probs("policy_log_probs", policy_log_probs)
    if not isinstance(response_mask, Tensor):
        raise ValueError(f"response_mask must be a tensor, got {type(response_mask).__name__}")
    _check_same_shape("response_mask", response_mask, "policy_log_probs", policy_log_probs)
    if normalize_constant is not None:
        constant = _as_finite_float(normalize_constant, "normalize_constant")
        if constant <= 0:
            raise ValueError(f"normalize_constant must be > 0, got {normalize_constant}")
    per_token, loss_metadata = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange
    )
    if normalize_constant is None:
        per_sequence = masked_mean(per_token, response_mask, dim=-1)
    else:
        per_sequence = masked_normalize(per_token, response_mask, constant, dim=-1)
    loss = per_sequence.mean()
    scaled_loss = loss / gradient_accumulation_steps
    scaled_loss.backward()
    metadata = {
        "scaled_loss": scaled_loss.detach(),
        "unscaled_loss": loss.detach(),
        "num_response_tokens": (response_mask != 0).sum(),
    }
    if "clipped" in loss_metadata:
        clipped = loss_metadata["clipped"].detach()
        metadata["clipped"] = clipped
        metadata["clip_fraction"] = masked_mean(clipped.to(per_token.dtype), response_mask != 0)
    return scaled_loss.detach(), metadata


# --------------------------------------------------------------------------- KL penalty


def kl_penalty(
    policy_log_probs: Tensor,
    ref_log_probs: Tensor,
    kind: Literal["k1", "k2", "k3"] = "k3",
) -> Tensor:
    """Per-token estimates of KL(policy || reference) from the sampled tokens.

    With d = log q - log p (q the reference, p the policy): k1 = -d (unbiased, can be
    negative), k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased and never negative).
    Average it over response tokens (e.g. `masked_mean`) and add beta times it to the loss.

    Args:
        policy_log_probs, ref_log_probs: (...) float, the same shape.
        kind: "k1", "k2" or "k3".

    Returns:
        Per-token estimates, the inputs' shape, float32 (float64 stays).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KL_KINDS}")
    _check_float_tensor("policy_log_probs", policy_log_probs)
    _check_float_tensor("ref_log_probs", ref_log_probs)
    _check_same_shape("ref_log_probs", ref_log_probs, "policy_log_probs", policy_log_probs)
    dtype = compute_dtype(policy_log_probs.dtype, ref_log_probs.dtype)
    d = ref_log_probs.to(dtype) - policy_log_probs.to(dtype)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    # expm1(d) - d rather than exp(d) - d - 1: the latter rounds to small negative values
    # for |d| near 1e-8 in float32; the clamp covers any last-ulp rounding.
    return (torch.expm1(d) - d).clamp_min(0.0)
