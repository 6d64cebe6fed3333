"""The engine runs any method: a toy second method, written here in a few lines, gets
checkpoints, SIGKILL-safe exact resume (with its own data-source state), log-probs
through the wrapped module and a frozen reference, with nothing copied from SFT."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from posttrain.engine.loop import run_method  # noqa: E402
from posttrain.engine.method import Method  # noqa: E402
from posttrain.engine.run import Run  # noqa: E402
from posttrain.engine.settings import RunSettings  # noqa: E402

STEPS = 30


class ToyNLL(Method):
    """Plain NLL of two random rows of a fixed token tensor per step. The rows come from
    a generator that is the data source's own resumable state."""

    command = "toy"

    def __init__(self, settings: RunSettings, tokens: torch.Tensor, steps: int) -> None:
        self.settings, self.tokens, self.steps = settings, tokens, steps
        self.rows = torch.Generator().manual_seed(0)

    def config_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.settings), "steps": self.steps}

    def prepare(self, tokenizer: Any, info: Any) -> int:
        return self.steps

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.get_state()}

    def load_state_dict(self, state: Any) -> None:
        self.rows.set_state(state["rows"])

    def step(self, run: Run, step: int) -> dict[str, float]:
        rows = self.tokens[torch.randint(len(self.tokens), (2,), generator=self.rows)]
        batch = {
            "input_ids": rows[:, :-1],
            "labels": rows[:, 1:],
            "attention_mask": torch.ones_like(rows[:, :-1]),
        }

        def objective(module: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple:
            out = module(b["input_ids"], b["attention_mask"], b["labels"], output="log_probs")
            return -out["log_probs"].mean(), {}

        loss = run.accumulate([batch], objective).all_reduced(run.info)["loss"]
        grad_norm, lr = run.optimizer_step(loss, step + 1)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr}


def toy_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (8, 12), generator=torch.Generator().manual_seed(1))


def toy_settings(model: Path, out: Path, **overrides: Any) -> RunSettings:
    values = dict(model=str(model), output_dir=str(out), lr=1e-2, warmup_steps=2)
    values.update(precision="fp32", num_threads=1, progress=False, save_every=5, keep_last=10)
    return RunSettings(**{**values, **overrides})


def run_toy(model: Path, out: Path, **overrides: Any) -> Path:
    settings = toy_settings(model, out, **overrides)
    vocab = int(load_file(model / "model.safetensors")["model.embed_tokens.weight"].shape[0])
    run_method(ToyNLL(settings, toy_tokens(vocab), STEPS), settings)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama_tokenizer) -> Path:
    from posttrain.models.tiny import tiny_causal_lm

    path = tmp_path_factory.mktemp("engine") / "model"
    tiny_causal_lm("llama", vocab_size=len(llama_tokenizer), hidden_size=32).save_pretrained(path)
    llama_tokenizer.save_pretrained(path)
    return path


def test_toy_method_runs_and_saves_its_config(model_dir, tmp_path, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="posttrain"):
        out = run_toy(model_dir, tmp_path / "run")
    # Said at start: on a busy machine the thread count decides the speed (issue 21, 11).
    assert "torch uses 1 CPU thread(s)" in caplog.text
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "config.yaml").read_text().startswith("# posttrain toy config")
    from posttrain.engine.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == STEPS and losses[-1] < losses[0]


def test_toy_method_killed_and_resumed_matches_uninterrupted(model_dir, tmp_path) -> None:
    from helpers import past_checkpoint, start_until

    whole = run_toy(model_dir, tmp_path / "whole")
    out = tmp_path / "killed"
    cmd = [sys.executable, __file__, str(model_dir), str(out)]
    proc = start_until(cmd, lambda: past_checkpoint(out, "step-000010"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    done = subprocess.run([*cmd, "resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    want = load_file(whole / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_a_method_whose_state_is_not_restored_would_diverge(model_dir, tmp_path) -> None:
    """The kill test can fail: resuming without the data source's state changes the
    weights (so it is the method's `state_dict` that makes the resume exact)."""
    whole = run_toy(model_dir, tmp_path / "whole", save_every=10)
    out = tmp_path / "forgetful"
    (out / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(whole / "checkpoints" / "step-000010", out / "checkpoints" / "step-000010")
    settings = toy_settings(model_dir, out, resume=True)
    vocab = int(load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"].shape[0])
    method = ToyNLL(settings, toy_tokens(vocab), STEPS)
    method.load_state_dict = lambda state: None  # type: ignore[method-assign]
    run_method(method, settings)
    want = load_file(whole / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert any(not torch.allclose(got[n], want[n], atol=1e-6, rtol=0) for n in want)


class ToyTwice(ToyNLL):
    """Two optimizer updates per step, as an RL step updates several times per rollout."""

    updates_per_step = 2

    def step(self, run: Run, step: int) -> dict[str, float]:
        super().step(run, step)
        return super().step(run, step)


def test_the_schedule_spans_every_update_of_a_multi_update_step(model_dir, tmp_path) -> None:
    from posttrain.engine.metrics import read_metrics

    settings = toy_settings(model_dir, tmp_path / "run", lr_scheduler="linear", warmup_steps=0)
    tokens = toy_tokens(int(load_file(model_dir / "model.safetensors")["lm_head.weight"].shape[0]))
    run_method(ToyTwice(settings, tokens, 4), settings)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    # Update k of 8 (0-based) runs at lr * (1 - k / 8); each step logs its second update.
    assert lrs == pytest.approx([settings.lr * (1 - k / 8) for k in (1, 3, 5, 7)])


class ToyWithReference(ToyNLL):
    needs_reference = True


def reference_check(model_dir: Path, out: Path, lora: bool, strategy: str = "ddp") -> dict:
    """Three steps of a method that holds a reference, then how far the reference's and
    the policy's log-probs are from the starting model's (every rank must call this)."""
    from transformers import AutoModelForCausalLM

    from posttrain.common.distributed import init_distributed
    from posttrain.engine.setup import prepare_run
    from posttrain.primitives import get_response_log_probs

    lora_settings = {"lora_r": 4, "lora_dropout": 0.0, "lr": 5e-2} if lora else {}
    settings = toy_settings(model_dir, out, strategy=strategy, **lora_settings)
    tokens = toy_tokens(int(load_file(model_dir / "model.safetensors")["lm_head.weight"].shape[0]))
    method = ToyWithReference(settings, tokens, 5)
    run = prepare_run(method, settings, init_distributed())
    for step in range(3):
        method.step(run, step)
    batch = {
        "input_ids": tokens[:3, :-1],
        "labels": tokens[:3, 1:],
        "attention_mask": torch.ones_like(tokens[:3, :-1]),
    }
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = get_response_log_probs(start, batch["input_ids"], batch["labels"])["log_probs"]
    reference = run.reference_log_probs(batch)
    policy = run.log_probs(batch, with_entropy=True)
    return {
        "reference_error": float((reference - want).abs().max()),
        "reference_has_grad": reference.requires_grad,
        "policy_moved": float((policy["log_probs"] - want).abs().max()),
        "entropy_shape": list(policy["token_entropy"].shape),
        "holds_a_copy": run.reference is not None,
    }


@pytest.mark.parametrize("lora", [False, True])
def test_log_probs_through_the_wrapper_and_a_frozen_reference(model_dir, tmp_path, lora) -> None:
    """After a few steps the policy's log-probs have moved; the reference's are the
    starting model's (a frozen copy, or with LoRA the model with its adapters off)."""
    result = reference_check(model_dir, tmp_path / "run", lora)
    assert result["holds_a_copy"] != lora  # LoRA holds no second model
    assert result["reference_error"] < 1e-5 and not result["reference_has_grad"]
    assert result["entropy_shape"] == [3, 11]
    assert result["policy_moved"] > 1e-3


def test_step_statistics_stay_on_the_device_until_one_read(monkeypatch, llama_tokenizer) -> None:
    """No tensor is read back to the host per micro-batch (each read is a GPU sync):
    the SFT step's statistics are summed on the device and read once, after the step."""
    from posttrain.common.distributed import DistInfo
    from posttrain.engine.run import accumulate
    from posttrain.losses.nll import nll_objective, step_denominator
    from posttrain.models.policy import PolicyModule
    from posttrain.models.tiny import tiny_causal_lm

    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = tiny_causal_lm("llama", vocab_size=len(llama_tokenizer), hidden_size=32)
    ids = toy_tokens(len(llama_tokenizer))[:4]
    mask = torch.ones_like(ids[:, 1:])
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": mask}
    batches = [{**batch, "response_mask": mask.float()}] * 3
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    objective = nll_objective("token", step_denominator(batches, "token", cpu))
    sums = accumulate(PolicyModule(model, chunk_size=5), batches, objective, cpu, None)
    assert reads == []
    totals = sums.all_reduced(cpu)
    assert reads == ["tolist"]
    assert totals["num_tokens"] == 3 * mask.numel()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    run_toy(model, out, resume=len(sys.argv) > 3)
