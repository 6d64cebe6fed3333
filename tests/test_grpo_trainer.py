"""`posttrain grpo` end to end on a tiny model: the loop, its metrics and rollouts, exact
normalisation, settings checks, a failing reward, kill/resume, and 2 ranks vs 1."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_same_final_weights,
    command_for,
    metrics,
    past_checkpoint,
    reverse_task,
    start_until,
    write_jsonl,
)

from posttrain.config.grpo import GRPOConfig
from posttrain.grpo.train import train_grpo

ROOT = Path(__file__).resolve().parent.parent
# A reward with a spread on an untrained model: the share of "a" in the response, a
# format reward for answering at all, and a failure on a marked question.
REWARD = """
def score(response, gold):
    if gold == "boom":
        raise RuntimeError("cannot score this one")
    share = response.count("a") / max(len(response), 1)
    return {"reward": share, "format_reward": float(bool(response)), "answer_reward": share}
"""


@pytest.fixture(scope="module")
def rl_dir(tmp_path_factory, workdir) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    # The session's saved tiny Llama (conftest's workdir), read in place.
    (root / "model").symlink_to(workdir / "model")
    rows = [{"prompt": r["prompt"], "answer": r["response"]} for r in reverse_task(24, seed=0)]
    write_jsonl(root / "questions.jsonl", rows)
    write_jsonl(root / "boom.jsonl", [*rows[:3], {"prompt": "Reverse: ab ->", "answer": "boom"}])
    (root / "reward.py").write_text(REWARD, encoding="utf-8")
    return root


def grpo_settings(root: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A 3-step run on `rl_dir`'s questions: 8 rollouts (2 questions x 4) per step,
    optimizer updates of 4 in micro-batches of 2 (also the base of test_distributed's)."""
    return {
        "model": str(root / "model"),
        "train_file": str(root / "questions.jsonl"),
        "reward": f"{root / 'reward.py'}:score",
        "output_dir": str(out),
        "max_steps": 3,
        "rollout_batch_size": 8,
        "group_size": 4,
        "generation_batch_size": 4,
        "train_batch_size": 4,
        "micro_batch_size": 2,
        "max_new_tokens": 6,
        "lr": 1e-2,
        "precision": "fp32",
        "num_threads": 1,
        "progress": False,
        "seed": 0,
        **overrides,
    }


def grpo_config(root: Path, out: Path, **overrides: Any) -> GRPOConfig:
    return GRPOConfig(**grpo_settings(root, out, **overrides))


def test_grpo_runs_logs_and_writes_its_rollouts(rl_dir, tmp_path) -> None:
    out = tmp_path / "run"
    config = grpo_config(rl_dir, out, beta=0.04, loss_type="grpo_clip")
    result = train_grpo(config)
    assert result.steps == 3 and (out / "final" / "model.safetensors").is_file()
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "reward",
        "reward_std",
        "format_reward",
        "answer_reward",
        "frac_zero_std_groups",
        "response_length",
        "truncated_fraction",
        "loss",
        "grad_norm",
        "lr",
        "entropy",
        "clip_fraction",
        "kl",
        "rollout_seconds",
        "train_seconds",
        "rollout_tokens_per_s",
    ):
        assert all(key in r for r in rows), key
    # Two optimizer updates per step (8 rollouts, 4 per update): the second is off-policy.
    assert rows[-1]["kl"] > 0
    lines = (out / "rollouts" / "step_000002.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 8 and set(first) >= {
        "prompt",
        "response",
        "gold",
        "reward",
        "format_reward",
        "answer_reward",
        "advantage",
        "num_tokens",
        "finish_reason",
    }
    assert (out / "final" / "config.yaml").read_text().startswith("# posttrain grpo config")
    from posttrain.engine.metrics import plot_panels

    assert plot_panels(rows) == ["loss", "reward", "response length", "lr"]
    assert result.plot_path is not None and result.plot_path.stat().st_size > 0


def step_gradient(rl_dir: Path, tmp_path: Path, micro: int, normalization: str) -> dict:
    """The gradient of one GRPO update with fixed rollouts, split into micro-batches."""
    from posttrain.common.distributed import DistInfo
    from posttrain.engine.settings import RunSettings
    from posttrain.engine.setup import prepare_run
    from posttrain.grpo.method import GRPO

    config = grpo_config(
        rl_dir,
        tmp_path / f"g{micro}",
        micro_batch_size=micro,
        train_batch_size=8,
        length_normalization=normalization,
    )
    method = GRPO(config)
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = prepare_run(method, RunSettings.of(config), cpu)
    rollouts, _ = method._rollouts(run, 0)
    assert len({r.advantage for r in rollouts}) > 1  # something to learn
    updates = method._updates(run, rollouts)
    from posttrain.losses.policy_gradient import policy_gradient_objective

    run.accumulate(updates[0], policy_gradient_objective(method.loss))
    return {n: p.grad.clone() for n, p in run.model.named_parameters()}


@pytest.mark.parametrize("normalization", ["sequence", "constant", "token"])
def test_the_update_does_not_depend_on_the_micro_batch_split(rl_dir, tmp_path, normalization):
    whole = step_gradient(rl_dir, tmp_path, 4, normalization)
    split = step_gradient(rl_dir, tmp_path, 1, normalization)
    assert any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_batch_size": 10}, "rollout_batch_size 10 is not a multiple of group_size 4"),
        ({"train_batch_size": 3}, "rollout_batch_size 8 is not a multiple of train_batch_size"),
        ({"micro_batch_size": 3}, "train_batch_size 4 is not a multiple of micro_batch_size"),
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"cliprange": 1.5}, "cliprange must be in (0, 1)"),
        ({"beta": -0.1}, "beta must be >= 0"),
    ],
)
def test_bad_settings_are_one_line_before_anything_loads(rl_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grpo_config(rl_dir, tmp_path / "bad", **overrides)


def test_unknown_reward_and_template_are_refused_before_the_model_loads(rl_dir, tmp_path):
    from posttrain.cli.main import main

    common = ["grpo", "--model", str(rl_dir / "model"), "--train-file"]
    common += [str(rl_dir / "questions.jsonl"), "--output-dir", str(tmp_path / "x")]
    assert main([*common, "--reward", "nosuch"]) == 2
    template = tmp_path / "template.txt"
    template.write_text("no placeholder here", encoding="utf-8")
    assert main([*common, "--reward", "exact", "--prompt-template", str(template)]) == 2
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_a_failing_reward_names_the_question_and_keeps_the_last_step(rl_dir, tmp_path):
    from posttrain.engine.run import TrainingError

    out = tmp_path / "boom"
    # 4 questions, 2 per step: the marked one comes up in step 1 or 2.
    config = grpo_config(rl_dir, out, train_file=str(rl_dir / "boom.jsonl"), max_steps=2)
    with pytest.raises(TrainingError, match=r"boom.jsonl:4.*cannot score this one") as error:
        train_grpo(config)
    if "before step 2" in str(error.value):
        assert "checkpoint of step 1" in str(error.value)
        assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()


def test_killed_and_resumed_run_matches_the_uninterrupted_one(rl_dir, tmp_path) -> None:

    whole = tmp_path / "whole"
    train_grpo(grpo_config(rl_dir, whole, max_steps=6, save_every=2, beta=0.04))
    out = tmp_path / "killed"
    config = grpo_config(rl_dir, out, max_steps=6, save_every=2, beta=0.04)
    cmd = command_for("grpo", config, tmp_path)
    proc = start_until(cmd, lambda: past_checkpoint(out, "step-000002"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_final_weights(whole, out, atol=1e-5)
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


def test_sigterm_checkpoints_and_resumes_exactly(rl_dir, tmp_path) -> None:

    whole = tmp_path / "whole"
    train_grpo(grpo_config(rl_dir, whole, max_steps=5))
    out = tmp_path / "stopped"
    config = grpo_config(rl_dir, out, max_steps=5)
    cmd = command_for("grpo", config, tmp_path)
    proc = start_until(cmd, lambda: (out / "metrics.jsonl").exists())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert "resume with: posttrain grpo" in err.decode()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_final_weights(whole, out, atol=1e-5)


def test_rollouts_do_not_depend_on_how_chunks_are_shared_out(rl_dir, tmp_path) -> None:
    """Chunk c is sampled from (seed, step, c) alone: generating the chunks one by one in
    any order gives the rollouts of one call."""
    from posttrain.generation.decode import load_model_and_tokenizer
    from posttrain.grpo.method import GRPO
    from posttrain.rollouts.sampling import chunk_seed

    config = grpo_config(rl_dir, tmp_path / "r")
    method = GRPO(config)
    model, tokenizer = load_model_and_tokenizer(rl_dir / "model", "cpu")
    method.prepare(tokenizer, _cpu())
    from posttrain.rollouts.sampling import _sample_chunk, sample_rollouts

    chosen = method.questions.for_step(0, 1, 2)
    together = sample_rollouts(
        model,
        tokenizer,
        method.questions,
        chosen,
        method.sampling,
        1,
        method.reward_fn,
        _cpu(),
        every_rank_samples_all=False,
    )
    apart = []
    for c in (1, 0):  # the second chunk first: another rank's share
        apart = (
            _sample_chunk(
                model,
                tokenizer,
                method.questions,
                [chosen[c]],
                method.sampling,
                chunk_seed(0, 1, c),
                method.reward_fn,
            )
            + apart
        )
    assert [r.response_ids for r in apart] == [r.response_ids for r in together]
    assert len({tuple(r.response_ids) for r in together}) > 1  # sampled, not all alike


def _cpu() -> Any:
    from posttrain.common.distributed import DistInfo

    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_expert_iteration_keeps_the_correct_responses_and_learns_from_them(rl_dir, tmp_path):
    from safetensors.torch import load_file

    from posttrain.config.grpo import ExpertIterationConfig
    from posttrain.grpo.train import train_expert_iteration

    reward = tmp_path / "has_a.py"
    reward.write_text(
        "def score(response, gold):\n"
        "    ok = float('a' in response)\n"
        "    return {'reward': ok, 'format_reward': 1.0, 'answer_reward': ok}\n",
        encoding="utf-8",
    )
    out = tmp_path / "ei"
    values = grpo_config(rl_dir, out, reward=f"{reward}:score", train_batch_size=8).__dict__
    config = ExpertIterationConfig(**{**values, "sft_epochs": 2})
    result = train_expert_iteration(config)
    assert result.steps == 3
    rows = metrics(out)
    assert all("kept" in r and 0 <= r["kept_fraction"] <= 1 for r in rows)
    for step, row in enumerate(rows, start=1):
        kept = [
            json.loads(x)
            for x in (out / "kept" / f"step_{step:06d}.jsonl").read_text().splitlines()
        ]
        sampled = [
            json.loads(x)
            for x in (out / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        ]
        assert len(kept) == row["kept"]
        assert all(k["reward"] == 1.0 for k in kept)
        distinct = {(s["question"], s["response"]) for s in sampled if s["reward"] == 1.0}
        assert len(kept) == len(distinct)  # each correct response once
    assert sum(r["kept"] for r in rows) > 0
    # lr is the rate of the step's last update, as every method logs it: step 1 makes
    # sft_epochs x (kept / train_batch_size) updates of a cosine schedule planned for
    # steps x sft_epochs x (rollout_batch_size / train_batch_size) = 6.
    updates = 2 * math.ceil(rows[0]["kept"] / 8)
    want = 0.5 * config.lr * (1 + math.cos(math.pi * (updates - 1) / 6))
    assert updates > 0 and rows[0]["lr"] == pytest.approx(want, rel=1e-9)
    start = load_file(rl_dir / "model" / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], start[k]) for k in final)
    assert (
        (out / "final" / "config.yaml")
        .read_text()
        .startswith("# posttrain expert-iteration config")
    )
