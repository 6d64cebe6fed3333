"""The policy-gradient primitives against direct references, property-tested with hypothesis."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.rl import (
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    grpo_microbatch_train_step,
    kl_penalty,
)

FAST = settings(deadline=None, max_examples=30)
LOSS_TYPES = ["no_baseline", "reinforce_with_baseline", "grpo_clip"]


# --------------------------------------------------------------------------- inputs


def make_inputs(seed: int, batch: int, seq: int, dtype: torch.dtype = torch.float64) -> dict:
    """Random log-probs (<= 0), a nearby old policy, per-sequence rewards/advantages and a
    0/1 response mask, some rows of which are empty."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 4
    old = policy + torch.randn(batch, seq, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.rand(batch, seq, generator=g) < 0.6).to(torch.float32)
    mask[torch.rand(batch, generator=g) < 0.25] = 0.0
    return {
        "policy": policy.to(dtype),
        "old": old.to(dtype),
        "raw_rewards": torch.randint(0, 2, (batch, 1), generator=g).to(dtype),
        "advantages": torch.randn(batch, 1, generator=g, dtype=torch.float64).to(dtype),
        "mask": mask,
    }


shapes = st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(0, 2**31 - 1))


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------- references


def ref_group_rewards(rewards, group_size, eps, by_std):
    """Group statistics written out with the stdlib, one group at a time."""
    advantages = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = statistics.fmean(group)
        std = statistics.stdev(group) if len(group) > 1 else 0.0
        for r in group:
            advantages.append((r - mean) / (std + eps) if by_std and std > 0 else r - mean)
    return advantages


def ref_clip_loss(adv, policy, old, eps):
    """Per element in Python floats: (loss, clipped)."""
    loss, clipped = [], []
    for b in range(policy.shape[0]):
        a = float(adv[b, 0])
        loss_row, clip_row = [], []
        for t in range(policy.shape[1]):
            ratio = math.exp(float(policy[b, t]) - float(old[b, t]))
            plain = ratio * a
            clip = min(max(ratio, 1 - eps), 1 + eps) * a
            loss_row.append(-min(plain, clip))
            clip_row.append(clip < plain)
        loss.append(loss_row)
        clipped.append(clip_row)
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(clipped)


def ref_per_token(policy, loss_type, inputs, cliprange):
    """Straightforward torch, differentiable in `policy`."""
    if loss_type == "no_baseline":
        return -inputs["raw_rewards"] * policy
    if loss_type == "reinforce_with_baseline":
        return -inputs["advantages"] * policy
    ratio = torch.exp(policy - inputs["old"])
    adv = inputs["advantages"]
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * adv)


def ref_train_loss(policy, mask, steps, loss_type, inputs, cliprange, constant=None):
    """Per-sequence reduction as an explicit loop over rows."""
    per_token = ref_per_token(policy, loss_type, inputs, cliprange)
    rows = []
    for b in range(policy.shape[0]):
        total = (per_token[b] * mask[b]).sum()
        if constant is not None:
            rows.append(total / constant)
        elif mask[b].sum() > 0:
            rows.append(total / mask[b].sum())
        else:
            rows.append(total * 0)
    return torch.stack(rows).mean() / steps


# --------------------------------------------------------------------------- group rewards


def reward_table(values):
    """A reward_fn that looks the reward up by response index (the ground truth unused)."""

    def reward_fn(response, ground_truth):
        value = values[response]
        return {"reward": value, "format_reward": 1.0, "answer_reward": value}

    return reward_fn


@FAST
@given(
    group_size=st.integers(1, 5),
    n_groups=st.integers(1, 4),
    data=st.data(),
    by_std=st.booleans(),
    eps=st.sampled_from([0.0, 1e-6, 0.1]),
)
def test_group_rewards_match_reference(group_size, n_groups, data, by_std, eps):
    values = data.draw(
        st.lists(
            st.one_of(
                st.sampled_from([0.0, 0.5, 1.0]),
                st.floats(-10, 10, allow_nan=False, allow_subnormal=False),
            ),
            min_size=group_size * n_groups,
            max_size=group_size * n_groups,
        )
    )
    responses = list(range(len(values)))
    advantages, raw, meta = compute_group_normalized_rewards(
        reward_table(values), responses, ["gt"] * len(values), group_size, eps, by_std
    )
    assert advantages.dtype == raw.dtype == torch.float32
    assert advantages.shape == raw.shape == (len(values),)
    torch.testing.assert_close(raw, torch.tensor(values, dtype=torch.float32))
    expected = ref_group_rewards(values, group_size, eps, by_std)
    torch.testing.assert_close(
        advantages, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5
    )
    groups = [values[i : i + group_size] for i in range(0, len(values), group_size)]
    equal = [len(set(g)) == 1 for g in groups]
    assert meta["frac_groups_all_equal"] == pytest.approx(sum(equal) / len(groups))
    for index, is_equal in enumerate(equal):
        if is_equal:
            start = index * group_size
            assert torch.all(advantages[start : start + group_size] == 0)
    assert meta["reward_mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
    expected_std = statistics.stdev(values) if len(values) > 1 else 0.0
    assert meta["reward_std"] == pytest.approx(expected_std, abs=1e-9)
    assert meta["reward_max"] == max(values) and meta["reward_min"] == min(values)
    assert meta["format_reward_mean"] == 1.0
    assert meta["answer_reward_mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)


def test_identical_rewards_give_exact_zero_advantages():
    # 0.1 * 3 / 3 != 0.1 in floating point: the zeros must not come from the subtraction.
    values = [0.1, 0.1, 0.1, 0.0, 1.0, 1.0]
    advantages, _, meta = compute_group_normalized_rewards(
        reward_table(values), list(range(6)), ["x"] * 6, 3, 1e-6, True
    )
    assert torch.equal(advantages[:3], torch.zeros(3))
    assert advantages[3] < 0 < advantages[4]
    assert meta["frac_groups_all_equal"] == 0.5


@pytest.mark.parametrize("magnitude", [1e-200, 1e-30, 1e200])
def test_extreme_reward_magnitudes_stay_finite(magnitude):
    # The squares inside a plain std would underflow to 0 (or overflow to inf).
    values = [0.0, magnitude, -magnitude, magnitude]
    advantages, _, meta = compute_group_normalized_rewards(
        reward_table(values), list(range(4)), ["x"] * 4, 2, 0.0, True
    )
    expected = ref_group_rewards(values, 2, 0.0, True)
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float32))
    assert meta["reward_std"] == pytest.approx(statistics.stdev(values))


@pytest.mark.parametrize("by_std", [True, False])
def test_group_size_one_gives_zero_advantages(by_std):
    values = [0.0, 1.0, 0.25]
    advantages, raw, meta = compute_group_normalized_rewards(
        reward_table(values), [0, 1, 2], ["x"] * 3, 1, 1e-6, by_std
    )
    assert torch.equal(advantages, torch.zeros(3))
    assert not torch.isnan(advantages).any()
    assert raw.tolist() == values
    assert meta["frac_groups_all_equal"] == 1.0


def test_single_rollout_metadata_std_is_zero():
    _, _, meta = compute_group_normalized_rewards(lambda r, g: {"reward": 1}, ["a"], ["b"], 1, 0, 1)
    assert meta["reward_std"] == 0.0 and "format_reward_mean" not in meta


def test_reward_fn_receives_response_and_ground_truth():
    seen = []

    def reward_fn(response, ground_truth):
        seen.append((response, ground_truth))
        return {"reward": float(response == ground_truth)}

    advantages, raw, _ = compute_group_normalized_rewards(
        reward_fn, ["4", "5", "7", "7"], ["4", "4", "7", "7"], 2, 0.0, False
    )
    assert seen == [("4", "4"), ("5", "4"), ("7", "7"), ("7", "7")]
    assert raw.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert advantages.tolist() == [0.5, -0.5, 0.0, 0.0]


def _raises(response, ground_truth):
    raise RuntimeError("grader crashed")


@pytest.mark.parametrize(
    ("reward_fn", "responses", "truths", "group_size", "eps", "match"),
    [
        (reward_table([0] * 3), [0, 1, 2], ["a"] * 3, 2, 0.0, "not a multiple of group_size 2"),
        (reward_table([0] * 2), [0, 1], ["a"] * 2, 0, 0.0, "group_size must be >= 1"),
        (reward_table([0] * 2), [0, 1], ["a"] * 2, 1.0, 0.0, "group_size must be an int"),
        (reward_table([0] * 2), [0, 1], ["a"] * 3, 1, 0.0, "has 2 elements but .* has 3"),
        (reward_table([]), [], [], 1, 0.0, "empty"),
        (reward_table([0] * 2), [0, 1], ["a"] * 2, 1, -1.0, "advantage_eps must be >= 0"),
        (lambda r, g: {"score": 1.0}, [0, 1], ["a"] * 2, 1, 0.0, "key 'reward'.* rollout 0"),
        (lambda r, g: 1.0, [0], ["a"], 1, 0.0, "key 'reward'"),
        (reward_table([0.0, math.nan]), [0, 1], ["a"] * 2, 2, 0.0, "rollout 1 must be finite"),
        (reward_table([math.inf, 0.0]), [0, 1], ["a"] * 2, 2, 0.0, "rollout 0 must be finite"),
        (lambda r, g: {"reward": "x"}, [0], ["a"], 1, 0.0, "rollout 0 must be a number"),
    ],
)
def test_group_rewards_bad_input(reward_fn, responses, truths, group_size, eps, match):
    with pytest.raises(ValueError, match=match):
        compute_group_normalized_rewards(reward_fn, responses, truths, group_size, eps, True)


def test_reward_fn_exception_is_chained_and_named():
    with pytest.raises(ValueError, match=r"reward_fn _raises raised on rollout 0") as info:
        compute_group_normalized_rewards(_raises, ["a", "b"], ["a", "b"], 2, 0.0, True)
    assert isinstance(info.value.__cause__, RuntimeError)


# --------------------------------------------------------------------------- per-token losses


@FAST
@given(shapes, st.booleans())
def test_naive_loss_matches_reference(shape, flat):
    batch, seq, seed = shape
    inputs = make_inputs(seed, batch, seq)
    values = inputs["advantages"]
    policy = leaf(inputs["policy"])
    loss = compute_naive_policy_gradient_loss(values.reshape(-1) if flat else values, policy)
    expected = [
        [-float(values[b, 0]) * float(inputs["policy"][b, t]) for t in range(seq)]
        for b in range(batch)
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(policy.grad, (-values).expand(batch, seq))


@FAST
@given(shapes, st.sampled_from([0.0, 0.1, 0.2, 1.5]))
def test_grpo_clip_loss_matches_reference(shape, cliprange):
    batch, seq, seed = shape
    inputs = make_inputs(seed, batch, seq)
    policy = leaf(inputs["policy"])
    loss, meta = compute_grpo_clip_loss(inputs["advantages"], policy, inputs["old"], cliprange)
    expected, clipped = ref_clip_loss(
        inputs["advantages"], inputs["policy"], inputs["old"], cliprange
    )
    torch.testing.assert_close(loss, expected)
    assert torch.equal(meta["clipped"], clipped)
    assert meta["clip_fraction"].ndim == 0
    torch.testing.assert_close(meta["clip_fraction"].item(), clipped.double().mean().item())

    weights = torch.randn(batch, seq, dtype=torch.float64)
    (loss * weights).sum().backward()
    ref_policy = leaf(inputs["policy"])
    ref = ref_per_token(ref_policy, "grpo_clip", inputs, cliprange)
    (ref * weights).sum().backward()
    torch.testing.assert_close(policy.grad, ref_policy.grad)


def test_cliprange_zero_clips_ratio_to_one():
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    policy = leaf(torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], dtype=torch.float64))
    old = torch.tensor([[-1.5, -1.5], [-1.5, -1.5]], dtype=torch.float64)
    loss, meta = compute_grpo_clip_loss(adv, policy, old, 0.0)
    r = torch.exp(policy.detach() - old)
    torch.testing.assert_close(loss[0], -torch.minimum(r[0], torch.ones(2, dtype=torch.float64)))
    torch.testing.assert_close(loss[1], -torch.minimum(-r[1], -torch.ones(2, dtype=torch.float64)))
    # r > 1 with A > 0 and r < 1 with A < 0 are clipped; their gradient is zero.
    assert meta["clipped"].tolist() == [[True, False], [False, True]]
    loss.sum().backward()
    assert policy.grad[0, 0] == 0 and policy.grad[1, 1] == 0
    assert policy.grad[0, 1] != 0 and policy.grad[1, 0] != 0


def test_old_log_probs_are_a_constant():
    policy = leaf(-torch.rand(2, 3))
    adv = torch.tensor([[1.0], [-2.0]])
    loss, _ = compute_grpo_clip_loss(adv, policy, policy, 0.2)
    loss.sum().backward()
    # ratio = 1 in value; d ratio / d logp = 1 with old held fixed, so grad = -A.
    torch.testing.assert_close(policy.grad, (-adv).expand(2, 3))


@FAST
@given(shapes, st.sampled_from(LOSS_TYPES))
def test_policy_gradient_loss_dispatch(shape, loss_type):
    batch, seq, seed = shape
    inputs = make_inputs(seed, batch, seq)
    loss, meta = compute_policy_gradient_loss(
        inputs["policy"],
        loss_type,
        raw_rewards=inputs["raw_rewards"],
        advantages=inputs["advantages"],
        old_log_probs=inputs["old"],
        cliprange=0.2,
    )
    torch.testing.assert_close(loss, ref_per_token(inputs["policy"], loss_type, inputs, 0.2))
    assert ("clip_fraction" in meta) == (loss_type == "grpo_clip")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32(dtype):
    inputs = make_inputs(3, 4, 6, dtype=dtype)
    up = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    for loss_type in LOSS_TYPES:
        loss, _ = compute_policy_gradient_loss(
            inputs["policy"],
            loss_type,
            raw_rewards=inputs["raw_rewards"],
            advantages=inputs["advantages"],
            old_log_probs=inputs["old"],
            cliprange=0.2,
        )
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref_per_token(up["policy"], loss_type, up, 0.2))
    kl = kl_penalty(inputs["policy"], inputs["old"])
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, kl_penalty(up["policy"], up["old"]))

    policy = leaf(inputs["policy"])
    loss, _ = grpo_microbatch_train_step(
        policy, inputs["mask"], 2, "grpo_clip", advantages=inputs["advantages"],
        old_log_probs=inputs["old"], cliprange=0.2,
    )  # fmt: skip
    assert loss.dtype == torch.float32 and policy.grad.dtype == dtype
    ref_policy = leaf(up["policy"])
    expected = ref_train_loss(ref_policy, up["mask"], 2, "grpo_clip", up, 0.2)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(policy.grad, ref_policy.grad.to(dtype))


def test_float64_stays_float64():
    inputs = make_inputs(0, 2, 3)
    assert compute_naive_policy_gradient_loss(inputs["advantages"], inputs["policy"]).dtype == (
        torch.float64
    )
    assert kl_penalty(inputs["policy"], inputs["old"], "k2").dtype == torch.float64


# --------------------------------------------------------------------------- training step


@FAST
@given(
    shapes,
    st.sampled_from(LOSS_TYPES),
    st.integers(1, 4),
    st.sampled_from([None, 1.0, 7.0]),
    st.sampled_from([0.0, 0.2]),
)
def test_train_step_matches_reference(shape, loss_type, steps, constant, cliprange):
    batch, seq, seed = shape
    inputs = make_inputs(seed, batch, seq)
    policy = leaf(inputs["policy"])
    loss, meta = grpo_microbatch_train_step(
        policy,
        inputs["mask"],
        steps,
        loss_type,
        raw_rewards=inputs["raw_rewards"],
        advantages=inputs["advantages"],
        old_log_probs=inputs["old"],
        cliprange=cliprange,
        normalize_constant=constant,
    )
    ref_policy = leaf(inputs["policy"])
    expected = ref_train_loss(
        ref_policy, inputs["mask"], steps, loss_type, inputs, cliprange, constant
    )
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(policy.grad, ref_policy.grad)
    assert not loss.requires_grad and all(not v.requires_grad for v in meta.values())
    torch.testing.assert_close(meta["unscaled_loss"], expected.detach() * steps)
    assert int(meta["num_response_tokens"]) == int(inputs["mask"].sum())
    # Masked-out and empty rows get no gradient.
    assert torch.all(policy.grad[inputs["mask"] == 0] == 0)
    if loss_type == "grpo_clip":
        _, clipped = ref_clip_loss(inputs["advantages"], inputs["policy"], inputs["old"], cliprange)
        on = inputs["mask"] != 0
        expected_fraction = clipped[on].double().mean().item() if on.any() else 0.0
        assert meta["clip_fraction"].item() == pytest.approx(expected_fraction)
    else:
        assert "clip_fraction" not in meta


def test_empty_mask_row_contributes_nothing():
    inputs = make_inputs(5, 3, 4)
    mask = inputs["mask"].clone()
    mask[:2] = torch.tensor([1.0, 1.0, 0.0, 1.0])
    mask[2] = 0.0
    policy = leaf(inputs["policy"])
    loss, _ = grpo_microbatch_train_step(
        policy, mask, 1, "reinforce_with_baseline", advantages=inputs["advantages"]
    )
    assert torch.equal(policy.grad[2], torch.zeros(4, dtype=torch.float64))
    per_row = [
        -(inputs["advantages"][b, 0] * inputs["policy"][b, [0, 1, 3]]).mean() for b in range(2)
    ]
    # The empty row counts in the batch mean as a zero.
    torch.testing.assert_close(loss, (per_row[0] + per_row[1]) / 3)


def test_dr_grpo_normalize_constant_divides_the_masked_sum():
    policy = leaf(torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, _ = grpo_microbatch_train_step(
        policy, mask, 2, "reinforce_with_baseline", advantages=adv, normalize_constant=4
    )
    row0 = 2.0 * 6.0 / 4
    row1 = -1.0 * 1.0 / 4
    assert loss.item() == pytest.approx((row0 + row1) / 2 / 2)
    expected_grad = torch.tensor([[-2.0] * 3, [1.0, 1.0, 0.0]], dtype=torch.float64) / 4 / 2 / 2
    torch.testing.assert_close(policy.grad, expected_grad)


def test_train_step_accumulates_gradients_over_calls():
    inputs = make_inputs(11, 3, 5)
    policy = leaf(inputs["policy"])
    for _ in range(3):
        grpo_microbatch_train_step(
            policy, inputs["mask"], 3, "grpo_clip", advantages=inputs["advantages"],
            old_log_probs=inputs["old"], cliprange=0.2,
        )  # fmt: skip
    ref_policy = leaf(inputs["policy"])
    ref_train_loss(ref_policy, inputs["mask"], 1, "grpo_clip", inputs, 0.2).backward()
    torch.testing.assert_close(policy.grad, ref_policy.grad)


# --------------------------------------------------------------------------- KL


@FAST
@given(shapes, st.sampled_from(["k1", "k2", "k3"]), st.sampled_from([0.3, 1e-8, 3e-8, 2.0]))
def test_kl_penalty_matches_reference(shape, kind, scale):
    batch, seq, seed = shape
    g = torch.Generator().manual_seed(seed)
    p = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 3
    q = p + torch.randn(batch, seq, generator=g, dtype=torch.float64) * scale
    policy = leaf(p)
    kl = kl_penalty(policy, q, kind)
    expected, grads = [], []
    for b in range(batch):
        for t in range(seq):
            log_ratio = float(q[b, t]) - float(p[b, t])
            if kind == "k1":
                expected.append(-log_ratio)
                grads.append(1.0)
            elif kind == "k2":
                expected.append(0.5 * log_ratio**2)
                grads.append(-log_ratio)
            else:
                expected.append(math.exp(log_ratio) - log_ratio - 1)
                grads.append(1 - math.exp(log_ratio))
    torch.testing.assert_close(kl.reshape(-1), torch.tensor(expected, dtype=torch.float64))
    kl.sum().backward()
    torch.testing.assert_close(
        policy.grad.reshape(-1), torch.tensor(grads, dtype=torch.float64), atol=1e-7, rtol=1e-6
    )


@FAST
@given(shapes, st.sampled_from([1e-8, 3e-8, 1e-4, 1.0, 5.0]))
def test_k3_is_non_negative_in_float32(shape, scale):
    batch, seq, seed = shape
    g = torch.Generator().manual_seed(seed)
    p = -torch.rand(batch, seq, generator=g) * 3
    q = p + torch.randn(batch, seq, generator=g) * scale
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.all(kl_penalty(p.to(dtype), q.to(dtype), "k3") >= 0)
    assert torch.all(kl_penalty(p, p, "k3") == 0)


# --------------------------------------------------------------------------- bad tensor input


def _bad_calls():
    p = torch.zeros(2, 3)
    adv = torch.zeros(2, 1)
    mask = torch.ones(2, 3)
    grpo = {"advantages": adv, "old_log_probs": p, "cliprange": 0.2}
    return [
        (lambda: compute_naive_policy_gradient_loss(torch.zeros(3, 1), p), r"\(2, 1\) or \(2,\)"),
        (lambda: compute_naive_policy_gradient_loss(torch.zeros(2, 3), p), r"got \(2, 3\)"),
        (lambda: compute_naive_policy_gradient_loss(adv, torch.zeros(2)), r"\(batch, seq\)"),
        (lambda: compute_naive_policy_gradient_loss(adv, torch.zeros(2, 3, dtype=torch.long)),
         "floating-point"),
        (lambda: compute_naive_policy_gradient_loss([1.0, 2.0], p), "must be a torch.Tensor"),
        (lambda: compute_grpo_clip_loss(adv, p, torch.zeros(2, 4), 0.2),
         r"old_log_probs has shape \(2, 4\) but policy_log_probs has shape \(2, 3\)"),
        (lambda: compute_grpo_clip_loss(adv, p, p, -0.1), "cliprange must be finite and >= 0"),
        (lambda: compute_grpo_clip_loss(adv, p, p, math.nan), "cliprange"),
        (lambda: compute_grpo_clip_loss(adv, p, p, "0.2"), "cliprange must be a number"),
        (lambda: compute_policy_gradient_loss(p, "ppo", advantages=adv), "unknown loss_type 'ppo'"),
        (lambda: compute_policy_gradient_loss(p, "no_baseline", advantages=adv),
         "'no_baseline' requires raw_rewards"),
        (lambda: compute_policy_gradient_loss(p, "reinforce_with_baseline", raw_rewards=adv),
         "requires advantages"),
        (lambda: compute_policy_gradient_loss(p, "grpo_clip", advantages=adv),
         "requires old_log_probs, cliprange"),
        (lambda: grpo_microbatch_train_step(p, mask, 0, "grpo_clip", **grpo),
         "gradient_accumulation_steps must be >= 1"),
        (lambda: grpo_microbatch_train_step(p, mask, 2.0, "grpo_clip", **grpo),
         "gradient_accumulation_steps must be an int"),
        (lambda: grpo_microbatch_train_step(p, mask, True, "grpo_clip", **grpo),
         "gradient_accumulation_steps must be an int"),
        (lambda: grpo_microbatch_train_step(p, torch.ones(2, 4), 1, "grpo_clip", **grpo),
         r"response_mask has shape \(2, 4\)"),
        (lambda: grpo_microbatch_train_step(p, mask, 1, "grpo_clip", normalize_constant=0, **grpo),
         "normalize_constant must be > 0"),
        (lambda: grpo_microbatch_train_step(p, mask, 1, "grpo_clip", normalize_constant=math.inf,
                                            **grpo), "normalize_constant must be finite"),
        (lambda: grpo_microbatch_train_step(p, mask, 1, "nope", **grpo), "unknown loss_type"),
        (lambda: kl_penalty(p, p, "k4"), "unknown KL estimator kind 'k4'"),
        (lambda: kl_penalty(p, torch.zeros(3, 2)), r"ref_log_probs has shape \(3, 2\)"),
    ]  # fmt: skip


@pytest.mark.parametrize(("call", "match"), _bad_calls())
def test_bad_tensor_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
