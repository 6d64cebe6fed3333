"""DPO speed, memory and agreement: `posttrain.dpo.train.train_dpo` vs TRL's `DPOTrainer`.

Both runs do the same DPO on the same saved model, on the CPU, one whole process each
(interpreter start-up, imports, model loading, tokenization, the reference log-probs and
the final save included), timed from launch to exit, with the peak resident set size the
kernel reports for that child (`ru_maxrss` through `os.wait4`):

* data: `--pairs` (64) preference pairs from the first lines of `--data` (GSM8K
  prompt/completion): prompt = the question (`Question: ...\\nAnswer:`), chosen = its gold
  solution, rejected = the next question's solution (pair i takes row i + 1's, the last
  the first's).
* work: sigmoid loss, beta 0.1, micro-batch 4 pairs x 2 accumulation (8 pairs per
  step), `--steps` (8: one epoch), AdamW lr `--lr` (1e-6, both sides' default) constant,
  no warmup, betas (0.9, 0.999), eps 1e-8, no weight decay, clipping 1.0, fp32, seed 0.
* posttrain: `train_dpo(DPOConfig(...))` with its defaults otherwise: the reference is
  the starting weights' scores of every pair, computed once before the first step (no
  second model); its batch planner decides the order (length-grouped, seeded).
* trl: `DPOTrainer` in its own virtual environment (`--trl-venv`, made by
  `common.ensure_trl_venv`), `use_cpu=True`, `bf16=False` and `dtype=float32`, with TRL's
  defaults otherwise: a second (reference) model in memory, its fused LM head, and
  gradient checkpointing on (`DPOConfig`'s default; `--trl-gradient-checkpointing off`
  turns it off). `train_sampling_strategy="sequential"` over the pairs written in the
  order of posttrain's batch plan, so both train on the same micro-batches in the same
  order.

Both sides tokenize their own way (posttrain: prompt, then response + EOS id; TRL: prompt
and prompt + response + EOS text, the completion from where they diverge); the GSM8K
completions start with a space after "Answer:", a token boundary, so the ids agree.
`--check-losses` verifies that they do (every pair's ids and trained positions) and fails
unless every step's loss agrees to `--tolerance` (relative); the per-step loss, reward
margin and log-probs are compared on every invocation.

The model is the "vocab" case of benchmarks/train_throughput.py (`common.vocab_case_model`):
Qwen2, hidden 256, 4 layers, the real 151,936-entry Qwen2.5 vocabulary and tokenizer, tied
embeddings, random float32 weights, saved once under `--workdir`.

Usage:
    .venv/bin/python benchmarks/dpo.py [--steps 8] [--lr 1e-6] [--threads 2]
        [--runs posttrain trl] [--check-losses] [--workdir DIR] [--trl-venv DIR]

Prints one JSON line per run, one line comparing the per-step losses, and a summary line:
posttrain's pairs/s and peak memory as ratios to TRL's, against the targets (>= 2x pairs/s,
<= 0.4x peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
MAX_POSITIONS = 1024  # every GSM8K prompt + solution fits
MICRO_BATCH = 4
GRAD_ACCUM = 2
BETA = 0.1
SEED = 0
TARGET_SPEEDUP = 2.0
TARGET_MEMORY_RATIO = 0.4
RUNS = ("posttrain", "trl")
STATS = ("loss", "reward_margin", "logps_chosen", "logps_rejected")
TRL_KEYS = {
    "loss": "loss",
    "reward_margin": "rewards/margins",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


# --------------------------------------------------------------------------- preparation


def prepare(args: argparse.Namespace) -> list[int]:
    """Save the model + tokenizer (once) and the pairs under `workdir`: `pairs.jsonl` in
    data order for posttrain, `pairs_trl.jsonl` in the order of posttrain's batch plan for
    TRL's sequential sampler. Returns that order (indices into pairs.jsonl)."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from posttrain.config.dpo import DPOConfig
    from posttrain.data.batching import plan_batches
    from posttrain.data.pairs import PairFormat, load_pairs
    from posttrain.models.tiny import build_qwen_tokenizer

    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").is_file():
        vocab_case_model(MAX_POSITIONS, seed=SEED).save_pretrained(model_dir)
        build_qwen_tokenizer().save_pretrained(model_dir)
    rows = []
    with open(args.data, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == args.pairs:
                break
    if len(rows) < args.pairs:
        raise SystemExit(f"{args.data} has {len(rows)} rows; the benchmark needs {args.pairs}")
    pairs = [
        {
            "prompt": row["prompt"],
            "chosen": row["completion"],
            "rejected": rows[(i + 1) % len(rows)]["completion"],
        }
        for i, row in enumerate(rows)
    ]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # posttrain's own plan of epoch 0 (its defaults: length-grouped, seeded), flattened:
    # TRL's sequential sampler then cuts the same micro-batches in the same order.
    defaults = DPOConfig(model="m", train_file="f")
    fmt = PairFormat(max_seq_len=defaults.max_seq_len, append_eos=defaults.append_eos)
    tokenized = load_pairs(workdir / "pairs.jsonl", AutoTokenizer.from_pretrained(model_dir), fmt)
    plan = plan_batches([len(p) for p in tokenized], MICRO_BATCH, GRAD_ACCUM, 1, SEED, 0)
    order = [i for step in plan for micro in step for i in micro]
    if len(order) != len(pairs) or any(len(m) != MICRO_BATCH for s in plan for m in s):
        raise SystemExit("the pairs do not fill whole steps of equal micro-batches")
    (workdir / "pairs_trl.jsonl").write_text("".join(json.dumps(pairs[i]) + "\n" for i in order))
    return order


# --------------------------------------------------------------------------- the runs


def run_posttrain(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One `train_dpo` run; per-step statistics from its metrics.jsonl."""
    import posttrain.dpo.method as dpo_method
    from posttrain.config.dpo import DPOConfig
    from posttrain.dpo.train import train_dpo

    reference_s = 0.0
    score_pairs = dpo_method.score_pairs

    def timed_score_pairs(*a: Any, **k: Any) -> Any:
        nonlocal reference_s
        started = time.perf_counter()
        try:
            return score_pairs(*a, **k)
        finally:
            reference_s += time.perf_counter() - started

    dpo_method.score_pairs = timed_score_pairs
    result = train_dpo(
        DPOConfig(
            model=str(args.workdir / "model"),
            train_file=str(args.workdir / "pairs.jsonl"),
            micro_batch_size=MICRO_BATCH,
            grad_accum_steps=GRAD_ACCUM,
            max_steps=args.steps,
            beta=BETA,
            loss_type="sigmoid",
            lr=args.lr,
            lr_scheduler="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_eps=1e-8,
            max_grad_norm=1.0,
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
            if "loss" in row:
                steps.append({key: row[key] for key in STATS})
    return {
        "steps": steps,
        "loop_s": round(result.train_seconds, 2),
        "reference_s": round(reference_s, 2),
    }


def run_trl(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One `DPOTrainer` run (inside the TRL environment); per-step statistics."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    model_dir = str(args.workdir / "model")
    with open(args.workdir / "pairs_trl.jsonl", encoding="utf-8") as fh:
        dataset = Dataset.from_list([json.loads(line) for line in fh])

    steps: list[dict[str, float]] = []
    loop: dict[str, float] = {}

    class Recorder(TrainerCallback):
        """The loop's wall seconds and every logged step's statistics."""

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            loop["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            loop["end"] = time.perf_counter()

        def on_log(
            self, _args: Any, _state: Any, _control: Any, logs: Any = None, **k: Any
        ) -> None:
            if logs and "loss" in logs:
                steps.append({key: float(logs[TRL_KEYS[key]]) for key in STATS})

    config = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GRAD_ACCUM,
        beta=BETA,
        loss_type=["sigmoid"],
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_steps=args.steps,
        seed=SEED,
        gradient_checkpointing=args.trl_gradient_checkpointing == "on",
        train_sampling_strategy="sequential",
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
    trainer = DPOTrainer(
        model=model_dir,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Recorder()],
    )
    trainer.train()
    trainer.save_model(str(out_dir / "final"))
    if args.check_losses:  # the token ids TRL trained on, in its order, for the parent
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        ids = [{c: row[c] for c in columns} for row in trainer.train_dataset]
        (out_dir / "trl_ids.json").write_text(json.dumps(ids))
    return {
        "steps": steps,
        "loop_s": round(loop["end"] - loop["start"], 2),
        "trl": trl.__version__,
        "gradient_checkpointing": config.gradient_checkpointing,
    }


def child_main(args: argparse.Namespace) -> None:
    """Entry point of a timed subprocess: one run; prints its JSON."""
    out_dir = args.workdir / "runs" / args.run
    result = run_posttrain(args, out_dir) if args.run == "posttrain" else run_trl(args, out_dir)
    print(json.dumps(result), flush=True)


def launch(args: argparse.Namespace, run: str, python: str) -> dict[str, Any]:
    """Run one child; wall time from launch to exit and its own peak RSS."""
    out_dir = args.workdir / "runs" / run
    shutil.rmtree(out_dir, ignore_errors=True)  # no reference scores left from a last run
    cmd = [python, str(Path(__file__).resolve()), "--run", run]
    for flag in ("workdir", "threads", "steps", "lr", "trl_gradient_checkpointing"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.check_losses:
        cmd.append("--check-losses")
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}" if run == "posttrain" else ""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    if path:
        env["PYTHONPATH"] = path
    inner, wall, peak_mb = run_timed_child(cmd, env, run)
    if len(inner["steps"]) != args.steps:
        raise SystemExit(f"{run} logged {len(inner['steps'])} steps, not {args.steps}")
    pairs = args.steps * MICRO_BATCH * GRAD_ACCUM
    return {
        "run": run,
        "pairs_per_s": round(pairs / wall, 3),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak_mb, 1),
        **inner,
    }


# --------------------------------------------------------------------------- agreement


def check_ids(args: argparse.Namespace, order: list[int]) -> dict[str, Any]:
    """Compare the token ids and trained positions of every pair: posttrain's tokenization
    (prompt + response + EOS, loss on the response and EOS) against what TRL trained on
    (prompt_ids + chosen_ids / rejected_ids, in its order)."""
    from transformers import AutoTokenizer

    from posttrain.data.pairs import PairFormat, load_pairs

    tokenizer = AutoTokenizer.from_pretrained(args.workdir / "model")
    ours = load_pairs(args.workdir / "pairs.jsonl", tokenizer, PairFormat())
    theirs = json.loads((args.workdir / "runs" / "trl" / "trl_ids.json").read_text())
    if len(theirs) != len(order):
        return {"ids_equal": False, "why": f"TRL has {len(theirs)} pairs, not {len(order)}"}
    for k, row in enumerate(theirs):
        pair = ours[order[k]]
        for side in ("chosen", "rejected"):
            example = getattr(pair, side)
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"])
            if example.input_ids != ids or example.loss_mask != mask:
                return {"ids_equal": False, "why": f"pair {order[k]} ({side}) differs"}
    tokens = sum(len(p.chosen) + len(p.rejected) for p in ours)
    return {"ids_equal": True, "pairs_compared": len(theirs), "tokens_compared": tokens}


def compare_steps(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The per-step losses side by side; the largest relative (loss) and absolute (reward
    margin, log-probs) differences."""
    ours, theirs = rows["posttrain"]["steps"], rows["trl"]["steps"]
    out: dict[str, Any] = {
        "loss_posttrain": [round(s["loss"], 8) for s in ours],
        "loss_trl": [round(s["loss"], 8) for s in theirs],
        "max_rel_diff_loss": max(
            abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(ours, theirs, strict=True)
        ),
    }
    for key in STATS[1:]:
        out[f"max_abs_diff_{key}"] = max(
            abs(a[key] - b[key]) for a, b in zip(ours, theirs, strict=True)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (8: one epoch)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every run")
    parser.add_argument(
        "--trl-gradient-checkpointing", choices=("on", "off"), default="on", help="TRL's: on"
    )
    parser.add_argument("--check-losses", action="store_true", help="also compare token ids")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="--check-losses: relative")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompt/completion JSONL")
    parser.add_argument("--workdir", type=Path, default=None, help="reused between invocations")
    parser.add_argument("--trl-venv", type=Path, default=DEFAULT_TRL_VENV)
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run is not None:
        child_main(args)
        return
    if args.pairs % (MICRO_BATCH * GRAD_ACCUM):
        parser.error(f"--pairs must be a multiple of {MICRO_BATCH * GRAD_ACCUM}")
    if args.check_losses and set(args.runs) != set(RUNS):
        parser.error("--check-losses needs both runs")

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        args.workdir = (args.workdir or Path(tmp)).resolve()
        order = prepare(args)
        pythons = {"posttrain": sys.executable}
        if "trl" in args.runs:
            pythons["trl"] = str(ensure_trl_venv(args.trl_venv))
        common = {
            "threads": args.threads,
            "work": (
                f"{args.pairs} GSM8K pairs, {MICRO_BATCH} pairs x {GRAD_ACCUM} accumulation, "
                f"{args.steps} steps, sigmoid beta {BETA}, lr {args.lr:g} constant, fp32"
            ),
        }
        rows = {}
        for run in args.runs:
            rows[run] = launch(args, run, pythons[run])
            shown = {k: v for k, v in rows[run].items() if k != "steps"}
            print(json.dumps(shown | common | {"load": load_average()}), flush=True)
        if set(rows) != set(RUNS):
            return
        agreement = compare_steps(rows)
        if args.check_losses:
            agreement |= check_ids(args, order)
        print(json.dumps(agreement), flush=True)
        speedup = rows["posttrain"]["pairs_per_s"] / rows["trl"]["pairs_per_s"]
        memory = rows["posttrain"]["peak_rss_mb"] / rows["trl"]["peak_rss_mb"]
        summary = {
            "model": "qwen2 h256 l4 v151936 tied, Qwen2.5 tokenizer, fp32, random weights",
            "pairs_per_s_ratio": round(speedup, 2),
            "loop_s_ratio": round(rows["trl"]["loop_s"] / rows["posttrain"]["loop_s"], 2),
            "memory_ratio": round(memory, 3),
            "max_rel_diff_loss": agreement["max_rel_diff_loss"],
            "targets": {
                "min_pairs_per_s_ratio": TARGET_SPEEDUP,
                "max_memory_ratio": TARGET_MEMORY_RATIO,
            },
            "targets_met": speedup >= TARGET_SPEEDUP and memory <= TARGET_MEMORY_RATIO,
        }
        print(json.dumps(summary), flush=True)
        if args.check_losses and not (
            agreement.get("ids_equal") and agreement["max_rel_diff_loss"] <= args.tolerance
        ):
            raise SystemExit("posttrain and TRL disagree (see the line above)")


if __name__ == "__main__":
    main()
