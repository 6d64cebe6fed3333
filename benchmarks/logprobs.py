"""Guide-style full-logits log-probs vs posttrain's chunked path: time and peak memory.

Each case runs forward + backward of

    sum(log_probs * mask) + 0.01 * sum(entropy * mask)

on a Qwen2-architecture model built from config with the real 151,936-entry
vocabulary (hidden 256, 4 layers, tied embeddings, random weights), once with the
guide's code (`model(...).logits`, `log_softmax` + `gather`, entropy from `softmax`
and `logsumexp`) and once with `posttrain.primitives.lean_response_log_probs`. Each
path runs in a fresh Python process so neither sees the other's allocator state.

Reported per path: median seconds of several timed steps (after one warm-up step),
and the peak memory above the loaded model: on CPU the peak resident set size
(VmHWM, reset after loading; ru_maxrss where that is unavailable) minus the RSS
after loading the model and the batch; on a GPU torch.cuda.max_memory_allocated
minus the memory allocated after loading.

Usage: python benchmarks/logprobs.py [--batch 4] [--seq 512] [--repeats 5]
Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import read_status_kb, reset_peak_rss, vocab_case_model

PATHS = ("guide", "posttrain")


def _make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    mask = torch.zeros(batch, seq)
    for b in range(batch):
        # A realistic SFT row: ~40% prompt, then the response, then some right padding.
        prompt = int(seq * (0.35 + 0.1 * b / max(batch - 1, 1)))
        pad = int(seq * 0.15 * b / max(batch - 1, 1))
        mask[b, prompt : seq - pad] = 1.0
        if pad:
            attention_mask[b, seq - pad :] = 0
    return input_ids, labels, attention_mask, mask


def _guide_step(model, input_ids, labels, attention_mask, mask):
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
    return (log_probs * mask).sum() + 0.01 * (entropy * mask).sum()


def _posttrain_step(model, input_ids, labels, attention_mask, mask, chunk_size):
    from posttrain.primitives import lean_response_log_probs

    out = lean_response_log_probs(
        model,
        input_ids,
        labels,
        attention_mask=attention_mask,
        return_token_entropy=True,
        chunk_size=chunk_size,
    )
    if out is None:
        raise RuntimeError("the lean path does not support this model")
    return (out["log_probs"] * mask).sum() + 0.01 * (out["token_entropy"] * mask).sum()


def worker(args: argparse.Namespace) -> dict:
    """Run one path in this process and return its measurements."""
    import torch

    from posttrain.models.tiny import QWEN25_VOCAB_SIZE

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = vocab_case_model().to(device)
    model.train()
    batch = [t.to(device) for t in _make_batch(args.batch, args.seq, QWEN25_VOCAB_SIZE)]
    if args.path == "guide":

        def step():
            return _guide_step(model, *batch)
    else:

        def step():
            return _posttrain_step(model, *batch, args.chunk_size)

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset = reset_peak_rss()
        base = (read_status_kb("VmRSS") or 0) * 1024

    times = []
    for i in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        peak_source = "torch.cuda.max_memory_allocated"
    else:
        hwm = read_status_kb("VmHWM") if reset else None
        if hwm is not None:
            peak, peak_source = hwm * 1024 - base, "VmHWM"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
            peak_source = "ru_maxrss"
    return {
        "seconds": round(statistics.median(times), 3),
        "seconds_all": [round(t, 3) for t in times],
        "peak_extra_mb": round(peak / 2**20, 1),
        "peak_source": peak_source,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.path is not None:
        print(json.dumps(worker(args)), flush=True)
        return

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = {}
    for path in PATHS:
        cmd = [sys.executable, __file__, "--path", path, "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--repeats", str(args.repeats)]
        if args.chunk_size is not None:
            cmd += ["--chunk-size", str(args.chunk_size)]
        if args.cpu:
            cmd.append("--cpu")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{path} worker failed with exit code {proc.returncode}")
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    guide, lean = results["guide"], results["posttrain"]
    case = {
        "case": f"qwen2-h256-l4-v151936 b{args.batch}x{args.seq} fwd+bwd logp+0.01*entropy",
        "device": guide["device"],
        "chunk_size": args.chunk_size,
        "guide": guide,
        "posttrain": lean,
        "time_ratio": round(lean["seconds"] / guide["seconds"], 3),
        "memory_ratio": round(lean["peak_extra_mb"] / guide["peak_extra_mb"], 3),
    }
    print(json.dumps(case), flush=True)


if __name__ == "__main__":
    main()
