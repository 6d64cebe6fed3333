"""Data-parallel training on two CPU processes (gloo) against one process.

One `torchrun --standalone --nproc_per_node 2` launch runs every distributed job
(this file is also its worker script, see `_worker`), because starting Python and
importing transformers costs far more than the tiny trainings themselves. The jobs:
DDP and FSDP2 runs of 5 optimizer steps (with a checkpoint at step 3 and an
evaluation), a run whose ranks disagree on the config, and a data set with fewer
examples than ranks. The tests then compare against single-process runs in pytest's
own process with the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import reverse_task, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
TOLERANCE = 1e-5


def base_settings(root: Path, model: str, out: Path) -> dict[str, Any]:
    """A 5-step run; micro_batch_size is set per world size (global batch 8)."""
    return {
        "model": str(root / model),
        "train_file": str(root / "train.jsonl"),
        "eval_file": str(root / "eval.jsonl"),
        "output_dir": str(out),
        "grad_accum_steps": 2,
        "max_steps": STEPS,
        "eval_every": STEPS,
        "save_every": 3,
        "lr": 3e-3,
        "warmup_steps": 1,
        "seed": 0,
        "num_threads": 1,
        "progress": False,
        "precision": "fp32",
        "loss_chunk_size": 7,
    }


def cli_args(settings: dict[str, Any]) -> list[str]:
    args = ["sft"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


# --------------------------------------------------------------------------- the worker


def _worker(jobs_file: str) -> int:
    """Run each job's CLI arguments through `posttrain sft` on this rank (under torchrun).

    A job may give `rank1_extra` arguments that only rank 1 appends. The exit status
    of every job goes to `<jobs_file>.rank<R>.json`.
    """
    import torch.distributed as dist

    from posttrain.cli.main import main

    # One process group for all jobs: `train` uses a group it finds and leaves it up,
    # whereas re-creating the group through torchrun's store after destroying it hangs.
    dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    jobs = json.loads(Path(jobs_file).read_text(encoding="utf-8"))
    codes = {}
    for name, job in jobs.items():
        argv = job["argv"] + (job.get("rank1_extra", []) if rank == 1 else [])
        print(f"=== job {name} rank {rank}", file=sys.stderr, flush=True)
        if "reference" in job:
            codes[name] = _reference_job(name, job["reference"], jobs_file, rank)
            continue
        codes[name] = main(argv)
    Path(f"{jobs_file}.rank{rank}.json").write_text(json.dumps(codes), encoding="utf-8")
    dist.destroy_process_group()
    return 0


def _reference_job(name: str, job: dict[str, Any], jobs_file: str, rank: int) -> int:
    """test_engine's reference check (a method with a frozen reference) on this rank."""
    from test_engine import reference_check

    result = reference_check(Path(job["model"]), Path(job["out"]), job["lora"], job["strategy"])
    Path(f"{jobs_file}.{name}.rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, llama_tokenizer) -> Path:
    """Two saved tiny Llamas (untied, and tied embeddings) and train/eval files."""
    from posttrain.models.tiny import tiny_causal_lm

    root = tmp_path_factory.mktemp("distributed")
    vocab = len(llama_tokenizer)
    for name, tied in (("model", False), ("model_tied", True)):
        model = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=32, tie_word_embeddings=tied)
        model.save_pretrained(root / name)
        llama_tokenizer.save_pretrained(root / name)
    write_jsonl(root / "train.jsonl", reverse_task(40, seed=0))
    # 5 examples over 2 ranks: the ranks score different numbers of eval examples.
    write_jsonl(root / "eval.jsonl", reverse_task(5, seed=1))
    write_jsonl(root / "one.jsonl", reverse_task(1, seed=2))
    from test_grpo_trainer import REWARD

    questions = [{"prompt": r["prompt"], "answer": r["response"]} for r in reverse_task(24, 0)]
    write_jsonl(root / "questions.jsonl", questions)
    (root / "reward.py").write_text(REWARD, encoding="utf-8")
    pairs = [
        {"prompt": r["prompt"], "chosen": r["response"], "rejected": " " + r["response"][::-1]}
        for r in reverse_task(24, seed=0)
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    (root / "has_a.py").write_text(
        "def score(response, gold):\n"
        "    ok = float('a' in response)\n"
        "    return {'reward': ok, 'format_reward': 1.0, 'answer_reward': ok}\n",
        encoding="utf-8",
    )
    return root


# Output dirs of the two-rank runs, by strategy; the tied model checks FSDP's handling
# of a parameter shared by the embeddings and the output head.
MODELS = {"ddp": "model", "fsdp": "model_tied"}
# LoRA on all linear layers of the body, no dropout (its masks would differ between two
# ranks and one process); the frozen head is tied under FSDP, untied under DDP.
LORA = {"lora_r": 4, "lora_dropout": 0.0, "lr": 1e-2}


def grpo_args(root: Path, out: Path, **overrides: Any) -> list[str]:
    """A 3-step `posttrain grpo` run: 8 rollouts (2 questions x 4) per step, two optimizer
    updates of 4 (the second off-policy under grpo_clip), a KL penalty to the start."""
    from test_grpo_trainer import grpo_settings

    clipped = {"loss_type": "grpo_clip", "beta": 0.04, **overrides}
    return ["grpo", *cli_args(grpo_settings(root, out, **clipped))[1:]]


def ei_args(root: Path, out: Path) -> list[str]:
    """A 3-step `posttrain expert-iteration` run: the correct ones of 8 responses per step
    (any number, so a rank may be short of them), two fine-tuning passes."""
    args = grpo_args(root, out, reward=f"{root / 'has_a.py'}:score", train_batch_size=8)
    args = [a for a in args if a not in ("--loss-type", "grpo_clip", "--beta", "0.04")]
    return ["expert-iteration", *args[1:], "--sft-epochs", "2"]


def dpo_args(root: Path, out: Path, micro: int, accum: int) -> list[str]:
    """A 4-step `posttrain dpo` run of 8 pairs per step (micro x accumulation x ranks)."""
    settings = {
        "model": str(root / "model"),
        "train_file": str(root / "pairs.jsonl"),
        "output_dir": str(out),
        "micro_batch_size": micro,
        "grad_accum_steps": accum,
        "max_steps": 4,
        "lr": 5e-3,
        "beta": 0.5,
        "precision": "fp32",
        "num_threads": 1,
        "progress": False,
    }
    return ["dpo", *cli_args(settings)[1:]]


def generation_eval(root: Path) -> dict[str, Any]:
    """Greedy answers to the eval prompts at the last step, scored by exact match."""
    return {
        "eval_generate_file": str(root / "eval.jsonl"),
        "eval_answer_field": "response",
        "reward": "exact",
        "eval_max_new_tokens": 6,
    }


def torchrun_two_ranks(args: list[str]) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 ARGS` on gloo, in a session of its own:
    on a timeout the whole group (torchrun and both workers) is killed, so no hung worker
    outlives the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return subprocess.Popen(
        [*cmd, "2", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def two_ranks(workdir) -> dict[str, Any]:
    """Launch every distributed job in one torchrun; return its outputs."""
    jobs = {}
    for strategy, model in MODELS.items():
        settings = base_settings(workdir, model, workdir / f"two-{strategy}")
        settings.update(micro_batch_size=2, strategy=strategy, **generation_eval(workdir))
        jobs[strategy] = {"argv": cli_args(settings)}
        settings = base_settings(workdir, model, workdir / f"two-lora-{strategy}")
        settings.update(micro_batch_size=2, strategy=strategy, **LORA)
        jobs[f"lora-{strategy}"] = {"argv": cli_args(settings)}
    # LoRA with dropout: the ranks draw different masks, so only each rank's own random
    # state makes the run resumed from its mid-run checkpoint match the uninterrupted one.
    dropout = base_settings(workdir, "model", workdir / "two-dropout")
    dropout.update(micro_batch_size=2, **{**LORA, "lora_dropout": 0.3})
    jobs["dropout"] = {"argv": cli_args(dropout)}
    dropout.update(
        output_dir=str(workdir / "two-dropout-resumed"),
        resume=str(workdir / "two-dropout/checkpoints/step-000003"),
    )
    jobs["dropout-resumed"] = {"argv": cli_args(dropout)}
    # A method with a frozen reference: sharded like the policy under FSDP, or with LoRA
    # the same model with its adapters off.
    for lora in (False, True):
        out = str(workdir / f"two-reference-{lora}")
        job = {"model": str(workdir / "model"), "out": out, "lora": lora, "strategy": "fsdp"}
        jobs[f"reference-{lora}"] = {"argv": [], "reference": job}
    jobs["grpo"] = {"argv": grpo_args(workdir, workdir / "two-grpo", micro_batch_size=1)}
    # FSDP: every rank samples every chunk (the sharded layers gather in step).
    fsdp = grpo_args(workdir, workdir / "two-grpo-fsdp", micro_batch_size=1, strategy="fsdp")
    jobs["grpo-fsdp"] = {"argv": fsdp}
    jobs["ei"] = {"argv": ei_args(workdir, workdir / "two-ei")}
    jobs["dpo"] = {"argv": dpo_args(workdir, workdir / "two-dpo", 2, 2)}
    disagree = base_settings(workdir, "model", workdir / "two-disagree")
    jobs["disagree"] = {"argv": cli_args(disagree), "rank1_extra": ["--lr", "0.001"]}
    tiny = base_settings(workdir, "model", workdir / "two-tiny")
    tiny.update(train_file=str(workdir / "one.jsonl"))
    jobs["tiny"] = {"argv": cli_args(tiny)}
    jobs_file = workdir / "jobs.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")

    proc = torchrun_two_ranks([__file__, str(jobs_file)])
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the two-rank jobs did not finish in 240 s:\n{err[-4000:]}")
    (workdir / "torchrun.log").write_text(stderr, encoding="utf-8")
    failed = [line for line in stderr.splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, "\n".join(failed[-20:]) or stderr[-4000:]
    codes = [json.loads(Path(f"{jobs_file}.rank{r}.json").read_text()) for r in (0, 1)]
    return {"codes": codes, "stderr": stderr}


def single_process_run(workdir: Path, strategy: str, out: Path, **overrides: Any) -> Path:
    """The same global batch (8) in one process: micro-batches of 4 instead of 2."""
    from posttrain.config import SFTConfig
    from posttrain.sft.train import train

    settings = base_settings(workdir, MODELS[strategy], out)
    settings.update(micro_batch_size=4, strategy=strategy, **overrides)
    train(SFTConfig(**settings))
    return out


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(workdir, two_ranks, tmp_path, strategy) -> None:
    assert all(codes[strategy] == 0 for codes in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    two = workdir / f"two-{strategy}"
    one = single_process_run(workdir, strategy, tmp_path / "one")
    train_two, eval_two = read_metrics(two)
    train_one, eval_one = read_metrics(one)
    # Rank 0 alone writes the metrics: each step once.
    assert [r["step"] for r in train_two] == list(range(1, STEPS + 1))
    for a, b in zip(train_two, train_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=0), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=TOLERANCE, rel=0), (a, b)
        assert a["token_accuracy"] == pytest.approx(b["token_accuracy"], abs=1e-9)
    assert eval_two[0]["eval_loss"] == pytest.approx(eval_one[0]["eval_loss"], abs=TOLERANCE)

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # The final model (gathered from the shards under FSDP) is a plain HF directory.
    model = AutoModelForCausalLM.from_pretrained(two / "final")
    if strategy == "fsdp":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    want, got = (
        load_file(one / "final/model.safetensors"),
        load_file(two / "final/model.safetensors"),
    )
    assert set(want) == set(got)
    for name in want:
        # Adam divides by sqrt(v): where a gradient is ~0, rounding differences of the
        # reduction order move a weight by up to ~2e-5 over 5 steps (lr 3e-3).
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=0, msg=name)
    assert "using the gloo backend" in two_ranks["stderr"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_in_one_process(workdir, two_ranks, tmp_path, strategy) -> None:
    assert all(codes[strategy] == 0 for codes in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    two = workdir / f"two-{strategy}"
    train_two, _ = read_metrics(two)
    out = tmp_path / "resumed"
    out.mkdir()
    # Only what a crash at step 3 would have left: the checkpoint and the metrics so far.
    shutil.copytree(two / "checkpoints/step-000003", out / "checkpoints/step-000003")
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in train_two[:3]), encoding="utf-8"
    )
    single_process_run(workdir, strategy, out, resume=True, eval_every=0, eval_file=None)
    resumed, _ = read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed[3:], train_two[3:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=0), (a, b)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_two_ranks_match_one_process(workdir, two_ranks, tmp_path, strategy) -> None:
    from safetensors.torch import load_file

    job = f"lora-{strategy}"
    assert all(codes[job] == 0 for codes in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    two = workdir / f"two-{job}"
    one = single_process_run(workdir, strategy, tmp_path / "one", **LORA)
    train_two, eval_two = read_metrics(two)
    train_one, eval_one = read_metrics(one)
    assert [r["step"] for r in train_two] == list(range(1, STEPS + 1))
    for a, b in zip(train_two, train_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=0), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=TOLERANCE, rel=0), (a, b)
    assert eval_two[0]["eval_loss"] == pytest.approx(eval_one[0]["eval_loss"], abs=TOLERANCE)
    # Checkpoints and final/adapter hold the adapter, gathered from the shards under FSDP.
    ckpt = two / "checkpoints/step-000003"
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()
    for name in ("final/adapter/adapter_model.safetensors", "final/model.safetensors"):
        want, got = load_file(one / name), load_file(two / name)
        assert set(want) == set(got), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0, msg=key)
    # The LoRA checkpoint of two ranks resumes in one process.
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ckpt, out / "checkpoints/step-000003")
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in train_two[:3]), encoding="utf-8"
    )
    single_process_run(
        workdir, strategy, out, resume=True, eval_every=0, eval_file=None, merge_lora=False, **LORA
    )
    resumed, _ = read_metrics(out)
    for a, b in zip(resumed[3:], train_two[3:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=0), (a, b)


def test_two_rank_lora_dropout_run_resumes_exactly(workdir, two_ranks) -> None:
    """Resumed with --resume PATH from its own mid-run checkpoint, a 2-rank LoRA run
    with dropout 0.3 ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from posttrain.engine.checkpoints import load_trainer_state

    for job in ("dropout", "dropout-resumed"):
        assert all(c[job] == 0 for c in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    whole, resumed = workdir / "two-dropout", workdir / "two-dropout-resumed"
    state = load_trainer_state(whole / "checkpoints/step-000003")
    per_rank = state["rng_per_rank"]
    assert len(per_rank) == 2 and not torch.equal(
        per_rank[0]["torch_cpu"], per_rank[1]["torch_cpu"]
    )
    name = "final/adapter/adapter_model.safetensors"
    want, got = load_file(whole / name), load_file(resumed / name)
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    steps = [r["step"] for r in read_metrics(resumed)[0]]
    assert steps == [4, 5]


@pytest.mark.parametrize("job", ["grpo", "grpo-fsdp"])
def test_grpo_two_ranks_match_one_process(workdir, two_ranks, tmp_path, job) -> None:
    """Each rank samples its chunks of the questions (under FSDP: all of them), the
    rollouts are gathered, each rank trains on its half: the same rollouts, losses and
    weights as one process."""
    from safetensors.torch import load_file

    from posttrain.cli.main import main

    assert all(c[job] == 0 for c in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    two, one = workdir / f"two-{job}", tmp_path / "one"
    assert main(grpo_args(workdir, one)) == 0
    rows_two, rows_one = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (two, one)
    )
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_two, rows_one, strict=True):
        for key in ("reward", "loss", "kl", "clip_fraction", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE, rel=0), (key, a, b)
    for step in (1, 2, 3):
        name = f"rollouts/step_{step:06d}.jsonl"
        assert (two / name).read_text() == (one / name).read_text()
    want, got = (
        load_file(one / "final/model.safetensors"),
        load_file(two / "final/model.safetensors"),
    )
    for key in want:
        # As for SFT (1e-4 at lr 3e-3): Adam divides by sqrt(v), so where a gradient is ~0
        # (an embedding row no rollout used) the reduction order's rounding moves a weight
        # by a fraction of lr; at lr 1e-2 up to ~3e-4.
        torch.testing.assert_close(got[key], want[key], atol=5e-4, rtol=0, msg=key)


def test_dpo_two_ranks_match_one_process(workdir, two_ranks, tmp_path) -> None:
    """8 pairs per step as 2 ranks x 2 pairs x 2 accumulations and as 8 x 1 in one
    process: the same losses (to 1e-5), the reference scored over the ranks alike."""
    from posttrain.cli.main import main

    assert all(c["dpo"] == 0 for c in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    two, one = workdir / "two-dpo", tmp_path / "one"
    assert main(dpo_args(workdir, one, 8, 1)) == 0
    rows_two, rows_one = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (two, one)
    )
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4]
    for a, b in zip(rows_two, rows_one, strict=True):
        for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen"):
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE, rel=0), (key, a, b)
    ref_two = torch.load(two / "reference_logps.pt", weights_only=True)["logps"]
    ref_one = torch.load(one / "reference_logps.pt", weights_only=True)["logps"]
    torch.testing.assert_close(ref_two, ref_one, atol=1e-5, rtol=0)


def test_expert_iteration_two_ranks_match_one_process(workdir, two_ranks, tmp_path) -> None:
    from safetensors.torch import load_file

    from posttrain.cli.main import main

    assert all(c["ei"] == 0 for c in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    two, one = workdir / "two-ei", tmp_path / "one"
    assert main(ei_args(workdir, one)) == 0
    rows_two, rows_one = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (two, one)
    )
    assert [r["kept"] for r in rows_two] == [r["kept"] for r in rows_one]
    assert any(r["kept"] % 2 for r in rows_two)  # a step whose kept responses split unevenly
    for a, b in zip(rows_two, rows_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=0, nan_ok=True), (a, b)
    want, got = (
        load_file(one / "final/model.safetensors"),
        load_file(two / "final/model.safetensors"),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0, msg=key)


@pytest.mark.parametrize("lora", [False, True])
def test_reference_log_probs_under_fsdp(workdir, two_ranks, lora) -> None:
    assert all(c[f"reference-{lora}"] == 0 for c in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    jobs_file = workdir / "jobs.json"
    for rank in (0, 1):
        result = json.loads(Path(f"{jobs_file}.reference-{lora}.rank{rank}.json").read_text())
        assert result["holds_a_copy"] != lora
        assert result["reference_error"] < 1e-5 and not result["reference_has_grad"]
        assert result["policy_moved"] > 1e-3


def test_sigterm_under_two_ranks_checkpoints_the_step(workdir, tmp_path) -> None:
    """A job scheduler's SIGTERM to torchrun and its workers: both ranks finish the step,
    save one complete checkpoint of it, and stop with the resume command."""
    import time

    from posttrain.engine.checkpoints import latest_checkpoint, load_trainer_state

    out = tmp_path / "stopped"
    settings = base_settings(workdir, "model", out)
    settings.update(micro_batch_size=2, max_steps=500, save_every=0, eval_every=0)
    settings.pop("eval_file")
    proc = torchrun_two_ranks(["-m", "posttrain", *cli_args(settings)])
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no training steps: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"did not stop on SIGTERM: {proc.communicate()[1][-3000:]}")
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None, stderr[-3000:]
    step = int(load_trainer_state(checkpoint)["step"])
    assert 2 <= step < 500
    assert f"stopped by SIGTERM after step {step}" in stderr
    assert len(load_trainer_state(checkpoint)["rng_per_rank"]) == 2
    assert not (out / "final").exists()


def test_ranks_that_disagree_on_the_config_stop_with_a_clear_error(two_ranks) -> None:
    assert [codes["disagree"] for codes in two_ranks["codes"]] == [2, 2]
    assert "ranks disagree on the config" in two_ranks["stderr"]
    assert "lr: 0.003 != 0.001" in two_ranks["stderr"]


def test_fewer_examples_than_ranks_is_explained(two_ranks) -> None:
    assert [codes["tiny"] for codes in two_ranks["codes"]] == [2, 2]
    assert "fewer than the 2 ranks" in two_ranks["stderr"]


def test_config_differences_name_the_settings() -> None:
    from posttrain.common.distributed import config_differences

    assert config_differences({"lr": 1.0, "seed": 0}, {"lr": 1.0, "seed": 0}) == []
    assert config_differences({"lr": 1.0, "seed": 0}, {"lr": 2.0, "seed": 0}) == ["lr: 1.0 != 2.0"]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_examples", [1, 7, 8, 9, 17, 40])
def test_steps_per_epoch_matches_the_plan(world_size, num_examples) -> None:
    from posttrain.data.batching import plan_batches

    if num_examples < world_size:
        return
    plan = plan_batches([5] * num_examples, 2, 2, world_size)
    # Full global batches, plus a smaller last step from the remainder, trimmed to a
    # multiple of the world size; what the trim drops is reported as left out.
    full, tail = divmod(num_examples, 4 * world_size)
    assert len(plan) == max(1, full + (1 if tail >= world_size else 0))
    assert plan.left_out == tail % world_size
    assert sum(len(ids) for step in plan for ids in step) == num_examples - plan.left_out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_generation_eval_on_two_ranks_matches_one_process(workdir, two_ranks, tmp_path, strategy):
    """Prompts split over the ranks (DDP) or answered by every rank (FSDP): either way the
    logged accuracy and the samples are what one process gets from the same weights."""
    from posttrain.cli.main import main

    assert all(codes[strategy] == 0 for codes in two_ranks["codes"]), two_ranks["stderr"][-4000:]
    two = workdir / f"two-{strategy}"
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in rows if "eval_accuracy" in r]
    assert logged["step"] == STEPS
    samples = [
        json.loads(x)
        for x in (two / "generations" / f"step_{STEPS:06d}.jsonl").read_text().splitlines()
    ]
    settings = generation_eval(workdir)
    argv = ["eval", "--model", str(two / "final"), "--data", settings["eval_generate_file"]]
    argv += ["--answer-field", "response", "--reward", "exact", "--max-new-tokens", "6"]
    argv += ["--output-dir", str(tmp_path / "eval"), "--device", "cpu"]
    assert main(argv) == 0
    again = [
        json.loads(x) for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    ]
    assert [s["response"] for s in samples] == [s["response"] for s in again]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert logged["eval_accuracy"] == pytest.approx(summary["accuracy"])


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
