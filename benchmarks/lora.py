"""Full fine-tuning vs LoRA (r=16, all-linear) through posttrain's `train()`: memory, speed.

Both runs of a case fine-tune the same saved model on the same data with the same
settings, `posttrain.sft.train.train(SFTConfig(...))` in fp32, one epoch; the LoRA run adds
`lora_r=16` (alpha 32, dropout 0.05, every linear layer of the body; the embeddings and
the output head stay frozen). Each run is a fresh Python process started by this script.

Measured per run:
* tokens/s: non-padding tokens of the epoch / the training loop's seconds (`train()`'s
  `train_seconds`: every optimizer step, without start-up, loading or the final save),
  the median of `--repeats` runs, full and LoRA runs interleaved. Also tokens per CPU
  second of the loop (all threads), which moves less with the load of a shared machine.
* peak memory above the loaded model, in a process of its own that runs one optimizer
  step (it holds the peak of both runs: activations, and for full fine-tuning the
  gradients and AdamW's moments): the peak resident set size during the training loop
  (VmHWM, reset once the model is loaded, adapted, on its device and resident, just
  before DDP/FSDP would wrap it) minus the RSS at that moment, with glibc returning freed
  blocks to the system (MEMORY_ENV below); on a GPU max_memory_allocated minus
  memory_allocated at that moment. This is what fine-tuning adds to holding the model.
* the whole process's wall time and peak RSS, final save included (a LoRA run's final
  save loads the base model again to write the merged model next to the adapter).

Cases:
* heavy: Llama, hidden 1024, 8 layers, vocab 8,192 (151 M parameters, nearly all in the
  body), micro-batch 1 x 256 tokens, accumulation 4, 6 steps: 24 GSM8K pairs, each a
  question and several answers, cut at 256 tokens. Target: LoRA's peak memory above the
  loaded model at most 0.35x full fine-tuning's, its tokens/s at least 0.9x.
* vocab: Qwen2, hidden 256, 4 layers, the real 151,936-entry Qwen2.5 vocabulary and
  tokenizer, tied embeddings (as benchmarks/train_throughput.py's vocab case): the first
  120 GSM8K pairs, micro-batch 4 x accumulation 2, 15 steps, max_seq_len 512. Target:
  LoRA's tokens/s at least full fine-tuning's.

Usage:
    python benchmarks/lora.py [--cases heavy vocab] [--threads 2] [--repeats 3]
        [--workdir DIR] [--data gsm8k_512.jsonl]

Prints one JSON line per run and one summary line per case (LoRA's ratios to the full
fine-tuning run of the same invocation, and whether the targets are met).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import load_average, read_status_kb, reset_peak_rss, vocab_case_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k_512.jsonl"
SEED = 0
LR = 1e-4
LORA = {"lora_r": 16, "lora_target_modules": "all-linear"}

CASES: dict[str, dict[str, Any]] = {
    "heavy": {
        "description": "llama h1024 l8 v8192 (151M parameters), BPE tokenizer",
        "examples": 24,
        "micro_batch_size": 1,
        "grad_accum_steps": 4,
        "max_seq_len": 256,
        "targets": {"max_memory_ratio": 0.35, "min_speed_ratio": 0.9},
    },
    "vocab": {
        "description": "qwen2 h256 l4 v151936 tied, Qwen2.5 tokenizer",
        "examples": 120,
        "micro_batch_size": 4,
        "grad_accum_steps": 2,
        "max_seq_len": 512,
        "targets": {"min_speed_ratio": 1.0},
    },
}
RUNS = ("full", "lora")
# glibc keeps freed blocks for reuse, so after a step RSS holds the allocator's high-water
# mark of several tensor sizes, not the live tensors (the first step of a LoRA run showed
# 2x its live activations). With a fixed mmap threshold every block over 64 KiB goes back
# to the system when freed, and RSS follows the live tensors as max_memory_allocated does
# on a GPU. Only the memory measurement runs with it; speed uses the default allocator.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# --------------------------------------------------------------------------- preparation


def _read_pairs(data: Path, n: int) -> list[dict[str, str]]:
    with open(data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if len(rows) < n:
        raise SystemExit(f"{data} has {len(rows)} pairs; the benchmark needs {n}")
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def _heavy_rows(pairs: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """`n` pairs whose completion runs on into the next answers: every one is longer
    than 256 tokens, so each trained example is exactly 256 tokens."""
    rows = []
    for i in range(n):
        answers = [pairs[(i + k) % len(pairs)]["completion"] for k in range(4)]
        rows.append({"prompt": pairs[i]["prompt"], "completion": "\n".join(answers)})
    return rows


def _build_model(case: str, model_dir: Path, pairs: list[dict[str, str]]) -> None:
    from posttrain.models.tiny import (
        build_qwen_tokenizer,
        tiny_causal_lm,
        train_bpe_tokenizer,
    )

    if case == "vocab":
        tokenizer = build_qwen_tokenizer()
        model = vocab_case_model(512, seed=SEED)
    else:
        texts = [p["prompt"] + p["completion"] for p in pairs]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=8192, add_bos=True)
        model = tiny_causal_lm(
            "llama",
            vocab_size=8192,
            hidden_size=1024,
            num_layers=8,
            num_heads=8,
            max_position_embeddings=256,
            seed=SEED,
        )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def prepare(workdir: Path, data: Path, cases: list[str]) -> dict[str, int]:
    """Write each case's training file and model directory; return its token count (the
    non-padding tokens of one epoch, as posttrain tokenizes and truncates them)."""
    from posttrain.config import SFTConfig
    from posttrain.data.tokenized import load_dataset_for_training
    from posttrain.models.loading import load_tokenizer

    pairs = _read_pairs(data, max(CASES[c]["examples"] for c in cases))
    counts = {}
    for case in cases:
        spec = CASES[case]
        case_dir = workdir / case
        case_dir.mkdir(parents=True, exist_ok=True)
        n = spec["examples"]
        rows = _heavy_rows(pairs, n) if case == "heavy" else pairs[:n]
        train_file = case_dir / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        model_dir = case_dir / "model"
        if not (model_dir / "config.json").is_file():
            _build_model(case, model_dir, pairs)
        config = SFTConfig(
            model=str(model_dir), train_file=str(train_file), max_seq_len=spec["max_seq_len"]
        )
        examples, _ = load_dataset_for_training(
            str(train_file), load_tokenizer(model_dir), config.data_format()
        )
        if len(examples) != n:
            raise SystemExit(f"{case}: {len(examples)} examples after loading, expected {n}")
        counts[case] = sum(len(e.input_ids) for e in examples)
    return counts


# --------------------------------------------------------------------------- a run


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class MemoryProbe:
    """Peak memory of the training loop above the model as it is about to be wrapped,
    and the CPU seconds of the loop (every thread)."""

    def __init__(self) -> None:
        self.base = 0
        self.peak_extra: int | None = None
        self.source = "VmHWM"
        self.cpu_s = 0.0

    def start(self) -> None:
        import torch

        self.cpu_s = -_cpu_seconds()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base, self.source = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
            torch.cuda.reset_peak_memory_stats()
            return
        if not reset_peak_rss():
            self.source = "ru_maxrss (VmHWM cannot be reset: includes loading)"
        self.base = (read_status_kb("VmRSS") or 0) * 1024

    def stop(self) -> None:
        import torch

        self.cpu_s += _cpu_seconds()
        if torch.cuda.is_available():
            self.peak_extra = torch.cuda.max_memory_allocated() - self.base
            return
        hwm = read_status_kb("VmHWM") if self.source == "VmHWM" else None
        peak = hwm * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_extra = peak - self.base


def _touch(module: Any) -> None:
    """Read every weight once. transformers maps safetensors files into memory, so the
    weights of a freshly loaded model become resident only when first read: the first
    forward would otherwise count the whole model as training memory."""
    import torch

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.sum()


def run_one(
    workdir: Path, case: str, run: str, threads: int, max_steps: int | None
) -> dict[str, Any]:
    """One `train()` run in this process (the epoch, or its first `max_steps`), with the
    memory probe around its loop."""
    import posttrain.engine.loop as loop
    import posttrain.engine.setup as setup
    import posttrain.sft.train as training
    from posttrain.config import SFTConfig

    probe = MemoryProbe()
    wrap, finish = setup.wrap_model, loop.finish

    def wrap_and_start(module: Any, *args: Any, **kwargs: Any) -> Any:
        _touch(module)
        probe.start()  # the model is loaded, adapted, on its device and resident
        return wrap(module, *args, **kwargs)

    def stop_and_finish(*args: Any, **kwargs: Any) -> Any:
        probe.stop()  # the loop is over; the final save is not measured
        return finish(*args, **kwargs)

    setup.wrap_model, loop.finish = wrap_and_start, stop_and_finish
    spec = CASES[case]
    config = SFTConfig(
        model=str(workdir / case / "model"),
        train_file=str(workdir / case / "train.jsonl"),
        output_dir=str(workdir / case / "runs" / run),
        max_seq_len=spec["max_seq_len"],
        micro_batch_size=spec["micro_batch_size"],
        grad_accum_steps=spec["grad_accum_steps"],
        epochs=1,
        max_steps=max_steps,
        lr=LR,
        lr_scheduler="constant",
        seed=SEED,
        precision="fp32",
        num_threads=threads,
        progress=False,
        overwrite=True,
        save_every=0,
        **(LORA if run == "lora" else {}),
    )
    result = training.train(config)
    return {
        "train_loop_s": round(result.train_seconds, 3),
        "steps": result.steps,
        "final_loss": round(result.final_loss, 4),
        "train_loop_cpu_s": round(probe.cpu_s, 3),
        "peak_extra_mb": round((probe.peak_extra or 0) / 2**20, 1),
        "peak_source": probe.source,
    }


def launch(args: argparse.Namespace, case: str, run: str, memory: bool) -> dict[str, Any]:
    """Run one child process; its own wall time and peak RSS, and what it reported.

    `memory`: the memory measurement, one optimizer step with glibc returning freed
    blocks to the system at once; else the speed measurement, the whole epoch.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", run, "--case", case]
    cmd += ["--workdir", str(args.workdir), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if memory:
        cmd += ["--max-steps", "1"]
        env.update(MEMORY_ENV)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        # wait4: this child's own rusage, not the maximum over every child so far.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(stderr)
        raise SystemExit(f"{case}/{run} failed")
    inner = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "process_peak_rss_mb": round(usage.ru_maxrss / 1024), **inner}


# --------------------------------------------------------------------------- main


def summarize(case: str, tokens: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    full, lora = results["full"], results["lora"]
    speed = lora["tokens_per_s"] / full["tokens_per_s"]
    memory = lora["peak_extra_mb"] / full["peak_extra_mb"]
    targets = CASES[case]["targets"]
    met = speed >= targets["min_speed_ratio"]
    if "max_memory_ratio" in targets:
        met = met and memory <= targets["max_memory_ratio"]
    spec = CASES[case]
    return {
        "case": case,
        "model": spec["description"],
        "work": (
            f"{spec['examples']} examples, micro-batch {spec['micro_batch_size']} x "
            f"{spec['grad_accum_steps']}, {tokens} tokens, one epoch, fp32"
        ),
        "lora": f"r={LORA['lora_r']} {LORA['lora_target_modules']}",
        "lora_speed_ratio": round(speed, 3),
        "lora_cpu_speed_ratio": round(lora["tokens_per_cpu_s"] / full["tokens_per_cpu_s"], 3),
        "lora_memory_ratio": round(memory, 3),
        "targets": targets,
        "targets_met": met,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every run")
    parser.add_argument(
        "--repeats", type=int, default=3, help="speed runs of each, interleaved; median kept"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompt/completion JSONL")
    parser.add_argument("--workdir", type=Path, default=None, help="reused between invocations")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run is not None:
        result = run_one(args.workdir, args.case, args.run, args.threads, args.max_steps)
        print(json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        args.workdir = (args.workdir or Path(tmp)).resolve()
        tokens = prepare(args.workdir, args.data, args.cases)
        for case in args.cases:
            memory = {run: launch(args, case, run, memory=True) for run in RUNS}
            samples: dict[str, list[dict[str, Any]]] = {run: [] for run in RUNS}
            # Interleaved, so that a change in the machine's load hits both runs alike.
            for _ in range(args.repeats):
                for run in RUNS:
                    samples[run].append(launch(args, case, run, memory=False))
            results = {
                run: speed_row(case, run, tokens[case], samples[run], memory[run], args.threads)
                for run in RUNS
            }
            for row in results.values():
                print(json.dumps(row), flush=True)
            print(json.dumps(summarize(case, tokens[case], results)), flush=True)


def speed_row(
    case: str,
    run: str,
    tokens: int,
    samples: list[dict[str, Any]],
    memory: dict[str, Any],
    threads: int,
) -> dict[str, Any]:
    """One run's line: medians over its speed samples, its memory measurement."""
    best = sorted(samples, key=lambda s: s["train_loop_s"])[len(samples) // 2]
    loop_s = statistics.median(s["train_loop_s"] for s in samples)
    cpu_s = statistics.median(s["train_loop_cpu_s"] for s in samples)
    return {
        "case": case,
        "run": run,
        "tokens": tokens,
        "tokens_per_s": round(tokens / loop_s, 1),
        "tokens_per_cpu_s": round(tokens / cpu_s, 1),
        "train_loop_s_all": [s["train_loop_s"] for s in samples],
        "peak_extra_mb": memory["peak_extra_mb"],
        "peak_source": memory["peak_source"],
        "steps": best["steps"],
        "final_loss": best["final_loss"],
        "wall_s": best["wall_s"],
        "process_peak_rss_mb": best["process_peak_rss_mb"],
        "threads": threads,
        "load_avg_1m_5m": load_average(),
    }


if __name__ == "__main__":
    main()
