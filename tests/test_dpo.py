"""DPO: the loss against its formulas, CS336's per-instance function against a direct
computation, and `posttrain dpo` end to end on a tiny model (the free reference, exact
normalisation, LoRA, kill/resume, bad input)."""

from __future__ import annotations

import logging
import math
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same_final_weights,
    command_for,
    metrics,
    past_checkpoint,
    reverse_task,
    start_until,
    write_jsonl,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.config.dpo import DPOConfig
from posttrain.dpo import compute_per_instance_dpo_loss, dpo_loss
from posttrain.dpo.train import train_dpo

finite = st.floats(-30, 0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=6),
    st.floats(0.01, 2.0),
    st.floats(0.0, 0.45),
)
def test_dpo_loss_matches_its_formulas(rows, beta, smoothing) -> None:
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows, strict=True))
    h = (pc - rc) - (pr - rr)
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    want = {
        "sigmoid": -(1 - smoothing) * torch.log(sig(beta * h))
        - smoothing * torch.log(sig(-beta * h)),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": torch.clamp(1 - beta * h, min=0),
    }
    for kind, expected in want.items():
        ls = smoothing if kind == "sigmoid" else 0.0
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, kind, ls)
        torch.testing.assert_close(losses.double(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(chosen.double(), beta * (pc - rc), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rejected.double(), beta * (pr - rr), atol=1e-5, rtol=1e-5)


def test_dpo_loss_refuses_bad_settings() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(x, x, x, x, 0.1, "kto")  # type: ignore[arg-type]


def test_per_instance_dpo_loss_is_the_direct_computation(tiny_llama, llama_tokenizer) -> None:
    import copy

    lm, ref = tiny_llama, copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    prompt, good, bad = "Reverse: abc ->", " cba", " abc"
    loss = compute_per_instance_dpo_loss(lm, ref, llama_tokenizer, 0.5, prompt, good, bad)

    def logp(model: Any, response: str) -> torch.Tensor:
        text = (
            "Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\n"
            f"{prompt}\n\n### Response:\n{response}"
        )
        ids = torch.tensor([[*llama_tokenizer(text)["input_ids"], llama_tokenizer.eos_token_id]])
        logits = model(ids).logits[:, :-1].float()
        return F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum()

    with torch.no_grad():
        h = (logp(lm, good) - logp(ref, good)) - (logp(lm, bad) - logp(ref, bad))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * h.item()))), rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lm.parameters())
    lm.zero_grad()


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def dpo_dir(tmp_path_factory, workdir) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    # The session's saved tiny Llama (conftest's workdir), read in place.
    (root / "model").symlink_to(workdir / "model")
    rows = [
        {"prompt": r["prompt"], "chosen": r["response"], "rejected": " " + r["response"][::-1]}
        for r in reverse_task(24, seed=0)
    ]
    write_jsonl(root / "pairs.jsonl", rows)
    write_jsonl(root / "eval.jsonl", rows[:5])
    return root


def dpo_config(root: Path, out: Path, **overrides: Any) -> DPOConfig:
    values: dict[str, Any] = {
        "model": str(root / "model"),
        "train_file": str(root / "pairs.jsonl"),
        "output_dir": str(out),
        "micro_batch_size": 2,
        "grad_accum_steps": 2,
        "max_steps": 6,
        "lr": 5e-3,
        "beta": 0.5,
        "precision": "fp32",
        "num_threads": 1,
        "progress": False,
        "seed": 0,
    }
    values.update(overrides)
    return DPOConfig(**values)


def test_dpo_trains_with_the_reference_computed_once(dpo_dir, tmp_path) -> None:
    out = tmp_path / "run"
    config = dpo_config(dpo_dir, out, eval_file=str(dpo_dir / "eval.jsonl"), eval_every=3)
    result = train_dpo(config)
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7)) and [r["step"] for r in evals] == [3, 6]
    for key in (
        "rewards_chosen",
        "rewards_rejected",
        "reward_margin",
        "reward_accuracy",
        "logps_chosen",
        "logps_rejected",
        "grad_norm",
        "lr",
        "tokens_per_s",
    ):
        assert key in train[0] and (
            key in ("grad_norm", "lr", "tokens_per_s") or f"eval_{key}" in evals[0]
        )
    # The first step's policy is the reference: the loss is log 2 and the rewards 0.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train[0]["rewards_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert evals[-1]["eval_reward_margin"] > 0 and train[-1]["loss"] < math.log(2)
    saved = torch.load(out / "reference_logps.pt", weights_only=True)
    assert saved["logps"].shape == (24 + 5, 2)
    assert result.final_model_dir == out / "final"
    from posttrain.engine.metrics import plot_panels

    assert plot_panels(rows) == ["loss", "reward margin", "preference accuracy", "lr"]


def test_dpo_runs_the_generation_evaluation(dpo_dir, tmp_path, caplog) -> None:
    # The evaluation every training command shares: greedy answers to held-out prompts,
    # scored, on its own cadence beside the held-out pairs' (here only at the end).
    questions = write_jsonl(
        tmp_path / "questions.jsonl",
        [{"prompt": r["prompt"], "answer": r["response"]} for r in reverse_task(4, seed=1)],
    )
    out = tmp_path / "run"
    config = dpo_config(
        dpo_dir,
        out,
        max_steps=4,
        eval_file=str(dpo_dir / "eval.jsonl"),
        eval_generate_file=str(questions),
        eval_generate_every=2,
        eval_generate_limit=3,
        eval_max_new_tokens=4,
        reward="exact",
    )
    with caplog.at_level(logging.INFO, logger="posttrain"):
        train_dpo(config)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "generation evaluation: greedy answers to 3 prompts" in said
    rows = metrics(out)
    generated = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in generated] == [2, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [4]
    for r in generated:
        assert {"eval_accuracy", "eval_format_rate", "eval_mean_response_length"} <= set(r)
        assert 0 <= r["eval_accuracy"] <= 1 and 0 < r["eval_mean_response_length"] <= 4
    for step in (2, 4):
        samples = (out / "generations" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert len(samples) == 3


def step_gradient(dpo_dir: Path, tmp_path: Path, micro: int, accum: int) -> dict:
    from posttrain.common.distributed import DistInfo
    from posttrain.dpo.method import DPO
    from posttrain.engine.settings import RunSettings
    from posttrain.engine.setup import prepare_run

    config = dpo_config(
        dpo_dir, tmp_path / f"g{micro}", micro_batch_size=micro, grad_accum_steps=accum
    )
    method = DPO(config)
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = prepare_run(method, RunSettings.of(config), cpu)
    method.setup(run)
    # A reference a little away from the start, so that the loss has a gradient to give.
    method.reference.logps += torch.linspace(-1, 1, method.reference.logps.numel()).reshape(-1, 2)
    from posttrain.data.batching import rank_micro_batches
    from posttrain.losses.dpo import dpo_objective

    step = method.plan(0)[0]
    batches = [method._batch(run, ids) for ids in rank_micro_batches(step, micro)]
    run.accumulate(batches, dpo_objective(method.loss, sum(len(ids) for ids in step)))
    return {n: p.grad.clone() for n, p in run.model.named_parameters()}


def test_the_step_does_not_depend_on_how_pairs_are_split(dpo_dir, tmp_path) -> None:
    whole = step_gradient(dpo_dir, tmp_path, 8, 1)
    split = step_gradient(dpo_dir, tmp_path, 2, 4)
    assert any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-5, rtol=1e-5, msg=name)


def test_lora_uses_the_model_without_adapters_as_reference(dpo_dir, tmp_path) -> None:
    out = tmp_path / "lora"
    train_dpo(dpo_config(dpo_dir, out, lora_r=4, lora_dropout=0.0, lr=5e-2, merge_lora=False))
    rows = metrics(out)
    assert not (out / "reference_logps.pt").exists()
    # The adapters start at zero: the first step's policy is the reference.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["reward_margin"] != 0


def test_killed_and_resumed_run_matches_and_reuses_the_reference(dpo_dir, tmp_path) -> None:
    whole = tmp_path / "whole"
    train_dpo(dpo_config(dpo_dir, whole, max_steps=12, save_every=2))
    out = tmp_path / "killed"
    config = dpo_config(dpo_dir, out, max_steps=12, save_every=2)
    cmd = command_for("dpo", config, tmp_path)
    proc = start_until(cmd, lambda: past_checkpoint(out, "step-000004"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stamp = (out / "reference_logps.pt").stat().st_mtime_ns
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "reference_logps.pt").stat().st_mtime_ns == stamp  # reused, not redone
    assert_same_final_weights(whole, out, atol=1e-6)


def test_sigterm_stops_with_a_checkpoint_and_resumes_exactly(dpo_dir, tmp_path) -> None:
    whole = tmp_path / "whole"
    train_dpo(dpo_config(dpo_dir, whole, max_steps=60))
    out = tmp_path / "stopped"
    config = dpo_config(dpo_dir, out, max_steps=60)
    cmd = command_for("dpo", config, tmp_path)
    proc = start_until(cmd, lambda: (out / "metrics.jsonl").exists())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert "resume with: posttrain dpo" in err.decode()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_final_weights(whole, out, atol=1e-6)


def test_pairs_that_teach_nothing_are_reported_before_training(dpo_dir, tmp_path, caplog):
    import logging

    rows = [
        {"prompt": "Reverse: ab ->", "chosen": " ba", "rejected": " ab"},
        {"prompt": "Reverse: cd ->", "chosen": " dc", "rejected": " dc"},
        {"prompt": "", "chosen": " x", "rejected": " y"},
        {"prompt": "Reverse: ef ->", "chosen": "", "rejected": " ef"},
    ]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = dpo_config(
        dpo_dir, tmp_path / "out", train_file=str(tmp_path / "pairs.jsonl"), max_steps=1
    )
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        train_dpo(config)
    said = caplog.text
    assert "1 pair(s) with identical chosen and rejected responses" in said
    assert "pairs.jsonl:2" in said
    assert "1 pair(s) with an empty prompt, first" in said and "pairs.jsonl:3" in said
    assert "1 pair(s) with an empty response, first" in said and "pairs.jsonl:4" in said


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, r"pairs.jsonl:2: missing field 'rejected'"),
        (
            {
                "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                "rejected": [
                    {"role": "user", "content": "y"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "pairs.jsonl:2: the chosen and rejected chats have different prompts",
        ),
    ],
)
def test_bad_pairs_are_one_line_naming_the_row(dpo_dir, tmp_path, row, message) -> None:
    good = {"prompt": "Reverse: ab ->", "chosen": " ba", "rejected": " ab"}
    write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    config = dpo_config(dpo_dir, tmp_path / "out", train_file=str(tmp_path / "pairs.jsonl"))
    with pytest.raises(ValueError, match=message):
        train_dpo(config)


def test_beta_zero_is_refused(dpo_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_config(dpo_dir, tmp_path / "out", beta=0.0)


def test_chat_pairs_train_like_sft_chats(dpo_dir, tmp_path, qwen_tokenizer) -> None:
    from posttrain.data.pairs import PairFormat, load_pairs

    chat = [{"role": "user", "content": "Reverse: abc"}]
    rows = [
        {
            "chosen": [*chat, {"role": "assistant", "content": "cba"}],
            "rejected": [*chat, {"role": "assistant", "content": "abc"}],
        }
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    (pair,) = load_pairs(tmp_path / "chat.jsonl", qwen_tokenizer, PairFormat())
    rendered = qwen_tokenizer.apply_chat_template(rows[0]["chosen"], tokenize=False)
    assert qwen_tokenizer.decode(pair.chosen.input_ids).strip() == rendered.strip()
    trained = [t for t, m in zip(pair.chosen.input_ids, pair.chosen.loss_mask, strict=True) if m]
    assert qwen_tokenizer.decode(trained).startswith("cba")
