"""Where the seconds of one posttrain training run go: a profile of train_throughput's run.

Runs the same configuration as `train_throughput.py --run posttrain` (same model, pairs,
micro-batch 4 x accumulation 2, 15 steps) in this process, under `torch.profiler`, and
prints one JSON object:

* start-up: `import torch`, `import posttrain.sft.train` (transformers with it), then the
  tokenizer and model loads and tokenization (`prepare_run`, which also plans the epoch);
* the loop: forward of the body and of the loss head (the `posttrain.body` /
  `posttrain.head` profiler ranges in `ResponseLoss`), backward, optimizer step;
* the head's matmuls, by shape: seconds, GFLOP/s in the run, and GFLOP/s of a plain
  `torch.mm` of the same shape into a reused output here, right after the run;
* the head's other work (softmax, statistics, casts), and the final save and plot.

The loop here calls the training loop's own phases (`SFTData.batches`,
`accumulate_gradients`, `optimizer_step`); backward is what `accumulate_gradients` spends
outside the body and head forward ranges. The profiler adds some overhead; compare
shares, and take whole-run speed from train_throughput.py.

Usage (after train_throughput.py has prepared --workdir):
    python benchmarks/train_profile.py --workdir DIR [--case vocab] [--bf16-head]
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()
import torch  # noqa: E402

_T_TORCH = time.perf_counter()
import posttrain.sft.train  # noqa: E402, F401

_T_POSTTRAIN = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from train_throughput import posttrain_config  # noqa: E402

from posttrain.common.distributed import init_distributed  # noqa: E402
from posttrain.engine.loop import finish  # noqa: E402
from posttrain.engine.settings import RunSettings  # noqa: E402
from posttrain.engine.setup import prepare_run  # noqa: E402
from posttrain.sft.method import SFT  # noqa: E402
from posttrain.sft.objective import accumulate_gradients  # noqa: E402


def run_loop(run: Any, method: SFT, config: Any) -> dict[str, float]:
    """Every step of the run, timed by phase (seconds)."""
    seconds: dict[str, float] = defaultdict(float)
    info = run.info

    def timed(phase: str, fn: Any, *args: Any) -> Any:
        started = time.perf_counter()
        with record_function(phase):
            result = fn(*args)
        seconds[phase] += time.perf_counter() - started
        return result

    for step in range(run.start_step, run.total_steps):
        batches = timed("batches", method.data.batches, step)
        sums = timed(
            "forward_and_backward",
            accumulate_gradients,
            run.module,
            batches,
            config.loss_normalization,
            info,
            run.autocast_dtype,
        )
        loss = sums.all_reduced(info)["loss"]
        timed("optimizer", run.optimizer_step, loss, step + 1)
    return seconds


def head_matmuls(events: Any, vocab: int) -> list[dict[str, Any]]:
    """The profiled matmuls with a vocabulary-sized dimension, grouped by shape."""
    rows = []
    for e in events:
        if e.key not in ("aten::mm", "aten::addmm", "aten::addmm_"):
            continue
        # mm(mat1, mat2); addmm(self, mat1, mat2)
        first = 0 if e.key == "aten::mm" else 1
        (m, k), (_, n) = e.input_shapes[first], e.input_shapes[first + 1]
        if vocab not in (m, k, n):
            continue
        seconds = e.self_cpu_time_total / 1e6
        flops = 2.0 * m * k * n * e.count
        rows.append(
            {
                "op": e.key,
                "shape": [m, k, n],
                "calls": e.count,
                "seconds": round(seconds, 2),
                "gflops_in_run": round(flops / seconds / 1e9, 1),
            }
        )
    return sorted(rows, key=lambda r: -r["seconds"])


def plain_mm_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of torch.mm (m, k) @ (k, n) into a reused output, after one warm-up."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    return 2.0 * m * k * n * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--case", choices=["vocab", "body"], default="vocab")
    parser.add_argument("--bf16-head", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out_dir = args.workdir / args.case / "runs" / "profile"
    config = posttrain_config(args.workdir, args.case, args.threads, args.bf16_head, out_dir)

    started = time.perf_counter()
    method = SFT(config)
    run = prepare_run(method, RunSettings.of(config), init_distributed())
    prepare_s = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        started = time.perf_counter()
        phases = run_loop(run, method, config)
        loop_s = time.perf_counter() - started
    started = time.perf_counter()
    finish(run, method, float("nan"), loop_s)
    finish_s = time.perf_counter() - started

    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    vocab = run.model.get_output_embeddings().weight.shape[0]
    matmuls = head_matmuls(prof.key_averages(group_by_input_shape=True), vocab)
    mm_dtype = torch.bfloat16 if args.bf16_head else torch.float32
    for row in matmuls[:4]:
        row["gflops_plain_mm"] = round(plain_mm_gflops(*row["shape"], mm_dtype), 1)
    body_s = totals.get("posttrain.body", 0.0)
    head_s = totals.get("posttrain.head", 0.0)
    head_mm_s = sum(r["seconds"] for r in matmuls)
    report = {
        "case": args.case,
        "head_matmul_dtype": "bf16" if args.bf16_head else "fp32",
        "startup_s": {
            "import_torch": round(_T_TORCH - _T0, 2),
            "import_posttrain_and_transformers": round(_T_POSTTRAIN - _T_TORCH, 2),
            "prepare_run_load_and_tokenize": round(prepare_s, 2),
        },
        "loop_s": round(loop_s, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "forward_s": {
            "body": round(body_s, 2),
            # The fused loss computes the head's gradients in forward.
            "head_loss_and_gradients": round(head_s, 2),
            "head_matmuls": round(head_mm_s, 2),
            "head_other_softmax_stats_casts": round(head_s - head_mm_s, 2),
        },
        "backward_s": round(phases["forward_and_backward"] - body_s - head_s, 2),
        "optimizer_fused_adamw_s": round(totals.get("aten::_fused_adamw_", 0.0), 2),
        "finish_save_and_plot_s": round(finish_s, 2),
        "head_matmuls": matmuls[:6],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
