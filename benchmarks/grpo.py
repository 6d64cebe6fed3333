"""GRPO speed and memory: `posttrain.grpo.train.train_grpo` vs TRL's `GRPOTrainer`, same work.

Both runs do the same on-policy RL on the same saved model, on the CPU, one whole
process each (interpreter start-up, imports, model loading and the final save
included), timed from launch to exit, with the peak resident set size the kernel
reports for that child (`ru_maxrss` through `os.wait4`):

* work: `--questions` (8) GSM8K questions (the `prompt` text of the first lines of
  `--data`, gold answers from `completion`) x `--group-size` (8) samples per step at
  temperature 1.0, top-p 1, no top-k, up to `--max-new-tokens` (64) new tokens, stopping
  at EOS; `gsm8k` reward (posttrain's own function on both sides); advantages normalised
  by the group's std; per-sequence mean loss; one optimizer step of all 64 rollouts per
  step in micro-batches of `--micro-batch` (16); AdamW lr 1e-5 constant, betas (0.9,
  0.95), clipping 1.0; `--steps` (3) steps; for each `--betas` value (0 and 0.04: a
  frozen reference model and a k3 KL penalty).
* posttrain: `train_grpo(GRPOConfig(...))`, fp32. Its metrics.jsonl gives each step's
  `rollout_seconds` (generation + scoring) and `train_seconds` (reference log-probs +
  forward/backward + optimizer).
* trl: `GRPOTrainer` with `loss_type="grpo"`, `num_iterations=1`,
  `per_device_train_batch_size` = micro-batch, `gradient_accumulation_steps` = 64 /
  micro-batch, `use_cpu=True`, fp32, no vLLM, in its own virtual environment
  (`--trl-venv`, created on first use with `pip install torch==2.13.0 trl==1.16.0
  transformers==<this environment's>`; never a dependency of posttrain). A callback
  times each optimizer step; rollout = time in `_generate` + `_calculate_rewards`,
  update = the rest of the step (reference and old log-probs, forward/backward,
  optimizer).

The model is the "vocab" case of benchmarks/train_throughput.py (`common.vocab_case_model`):
Qwen2, hidden 256, 4 layers, the real 151,936-entry Qwen2.5 vocabulary and tokenizer, tied
embeddings, random float32 weights, saved once under `--workdir`. Random weights rarely
emit EOS, so nearly every response runs to the token limit on both sides.

Usage:
    .venv/bin/python benchmarks/grpo.py [--betas 0 0.04] [--steps 3] [--threads 2]
        [--runs posttrain trl] [--workdir DIR] [--trl-venv DIR]

Prints one JSON line per run and one summary line per beta: posttrain's steps/s and peak
memory as ratios to TRL's, against the targets (>= 3x steps/s, <= 0.5x peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_TRL_VENV,
    ensure_trl_venv,
    load_average,
    run_timed_child,
    vocab_case_model,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k_512.jsonl"
MAX_POSITIONS = 512  # every GSM8K prompt + 64 new tokens fits
LR = 1e-5
SEED = 0
TARGET_SPEEDUP = 3.0
TARGET_MEMORY_RATIO = 0.5
RUNS = ("posttrain", "trl")


# --------------------------------------------------------------------------- preparation


def prepare(workdir: Path, data: Path, questions: int) -> None:
    """Save the vocab model + tokenizer and the questions file under `workdir` (once)."""
    sys.path.insert(0, str(ROOT))
    from posttrain.models.tiny import build_qwen_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(data, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                rows.append({"prompt": row["prompt"], "answer": row["completion"]})
            if len(rows) == questions:
                break
    if len(rows) < questions:
        raise SystemExit(f"{data} has {len(rows)} questions; the benchmark needs {questions}")
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (workdir / "questions.jsonl").write_text(text, encoding="utf-8")
    model_dir = workdir / "model"
    if not (model_dir / "config.json").is_file():
        vocab_case_model(MAX_POSITIONS, seed=SEED).save_pretrained(model_dir)
        build_qwen_tokenizer().save_pretrained(model_dir)


# --------------------------------------------------------------------------- the runs


def run_posttrain(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One `train_grpo` run; per-step seconds from its metrics.jsonl."""
    from posttrain.config.grpo import GRPOConfig
    from posttrain.grpo.train import train_grpo

    rollouts = args.questions * args.group_size
    result = train_grpo(
        GRPOConfig(
            model=str(args.workdir / "model"),
            train_file=str(args.workdir / "questions.jsonl"),
            prompt_field="prompt",
            answer_field="answer",
            reward="gsm8k",
            rollout_batch_size=rollouts,
            group_size=args.group_size,
            train_batch_size=rollouts,
            micro_batch_size=args.micro_batch,
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            max_steps=args.steps,
            beta=args.beta,
            lr=LR,
            lr_scheduler="constant",
            seed=SEED,
            precision="fp32",
            num_threads=args.threads,
            progress=False,
            output_dir=str(out_dir),
            overwrite=True,
        )
    )
    steps = []
    with open(result.metrics_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if "rollout_seconds" in row:
                rollout, update = row["rollout_seconds"], row["train_seconds"]
                steps.append({"step_s": rollout + update, "rollout_s": rollout, "update_s": update})
    return {"steps": steps, "final_loss": result.final_loss}


def run_trl(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One `GRPOTrainer` run (inside the TRL environment); per-step seconds."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards.builtin import gsm8k_reward

    torch.set_num_threads(args.threads)
    with open(args.workdir / "questions.jsonl", encoding="utf-8") as fh:
        dataset = Dataset.from_list([json.loads(line) for line in fh])

    def reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [gsm8k_reward(c, a)["reward"] for c, a in zip(completions, answer, strict=True)]

    class Timed(GRPOTrainer):
        """Adds up the seconds spent generating and scoring."""

        rollout_s = 0.0

        def _generate(self, *a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return super()._generate(*a, **k)
            finally:
                self.rollout_s += time.perf_counter() - started

        def _calculate_rewards(self, *a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return super()._calculate_rewards(*a, **k)
            finally:
                self.rollout_s += time.perf_counter() - started

    steps: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        """Wall seconds between optimizer steps; the rollout seconds inside each."""

        def __init__(self) -> None:
            self.last = time.perf_counter()

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.last = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            step_s, rollout = now - self.last, trainer.rollout_s
            steps.append({"step_s": step_s, "rollout_s": rollout, "update_s": step_s - rollout})
            trainer.rollout_s = 0.0
            self.last = now

    rollouts = args.questions * args.group_size
    config = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=rollouts // args.micro_batch,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=args.steps,
        seed=SEED,
        use_cpu=True,
        bf16=False,
        fp16=False,
        model_init_kwargs={"dtype": "float32"},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Timed(
        model=str(args.workdir / "model"),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        callbacks=[StepTimer()],
    )
    output = trainer.train()
    trainer.save_model(str(out_dir / "final"))
    return {"steps": steps, "final_loss": output.training_loss, "trl": trl.__version__}


def child_main(args: argparse.Namespace) -> None:
    """Entry point of a timed subprocess: one (run, beta); prints its JSON."""
    out_dir = args.workdir / "runs" / f"{args.run}_beta{args.beta}"
    result = run_posttrain(args, out_dir) if args.run == "posttrain" else run_trl(args, out_dir)
    print(json.dumps(result), flush=True)


def launch(args: argparse.Namespace, run: str, beta: float, python: str) -> dict[str, Any]:
    """Run one child; wall time from launch to exit and its own peak RSS."""
    cmd = [python, str(Path(__file__).resolve()), "--run", run, "--beta", str(beta)]
    for flag in ("workdir", "threads", "steps", "questions", "group_size", "max_new_tokens"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--micro-batch", str(args.micro_batch)]
    # The TRL side imports posttrain's reward from the source tree, nothing else of it.
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads)}
    inner, wall, peak_mb = run_timed_child(cmd, env, f"{run} (beta {beta})")
    steps = inner.pop("steps")
    if len(steps) != args.steps:
        raise SystemExit(f"{run} (beta {beta}) logged {len(steps)} steps, not {args.steps}")

    def mean(key: str) -> float:
        return round(statistics.mean(s[key] for s in steps), 2)

    return {
        "run": run,
        "beta": beta,
        "step_s": mean("step_s"),
        "rollout_s": mean("rollout_s"),
        "update_s": mean("update_s"),
        "steps_per_s": round(1 / statistics.mean(s["step_s"] for s in steps), 4),
        "step_s_each": [round(s["step_s"], 2) for s in steps],
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak_mb, 1),
        **inner,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--questions", type=int, default=8, help="questions per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per question")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompt/completion JSONL")
    parser.add_argument("--workdir", type=Path, default=None, help="reused between invocations")
    parser.add_argument("--trl-venv", type=Path, default=DEFAULT_TRL_VENV)
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run is not None:
        child_main(args)
        return
    if (args.questions * args.group_size) % args.micro_batch:
        parser.error("questions x group size must be a multiple of --micro-batch")

    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        args.workdir = (args.workdir or Path(tmp)).resolve()
        prepare(args.workdir, args.data, args.questions)
        pythons = {"posttrain": sys.executable}
        if "trl" in args.runs:
            pythons["trl"] = str(ensure_trl_venv(args.trl_venv))
        common = {
            "threads": args.threads,
            "work": (
                f"{args.questions} questions x {args.group_size} samples, <= "
                f"{args.max_new_tokens} new tokens, micro-batch {args.micro_batch}, "
                f"{args.steps} steps"
            ),
        }
        for beta in args.betas:
            rows = {}
            for run in args.runs:
                rows[run] = launch(args, run, beta, pythons[run])
                print(json.dumps(rows[run] | common | {"load": load_average()}), flush=True)
            if set(rows) != set(RUNS):
                continue
            speedup = rows["trl"]["step_s"] / rows["posttrain"]["step_s"]
            memory = rows["posttrain"]["peak_rss_mb"] / rows["trl"]["peak_rss_mb"]
            summary = {
                "beta": beta,
                "model": "qwen2 h256 l4 v151936 tied, Qwen2.5 tokenizer, fp32, random weights",
                "steps_per_s_ratio": round(speedup, 2),
                "wall_ratio": round(rows["trl"]["wall_s"] / rows["posttrain"]["wall_s"], 2),
                "memory_ratio": round(memory, 3),
                "targets": {
                    "min_steps_per_s_ratio": TARGET_SPEEDUP,
                    "max_memory_ratio": TARGET_MEMORY_RATIO,
                },
                "targets_met": speedup >= TARGET_SPEEDUP and memory <= TARGET_MEMORY_RATIO,
            }
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
