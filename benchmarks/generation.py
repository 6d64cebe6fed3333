"""Batched generation throughput: `posttrain.generation.decode.generate` vs one prompt at a time.

Both paths generate greedily, up to `--max-new-tokens` (64) new tokens per prompt,
stopping at EOS, from GSM8K test questions (the `question` field of `--data`, the
first `--num-prompts`, 128), with the same model in the same process:

* baseline: a plain loop of `model.generate` over the prompts, one prompt per call
  (batch 1, no padding, KV cache, `do_sample=False`), as a script would write it.
* engine: `generate(model, tokenizer, prompts, max_new_tokens=..., batch_size=B)` for
  each B of `--batch-sizes`: prompts sorted by length, left-padded batches, KV cache,
  and the per-token entropy recorded for every generated token (the baseline computes
  none, so the engine does strictly more work per token).

The model is the "vocab" case of benchmarks/train_throughput.py: Qwen2 architecture,
hidden 256, 4 layers, 4 heads, tied embeddings, the real 151,936-entry Qwen2.5
vocabulary and tokenizer (built offline), random weights, float32. Most of each decoding
step is the (rows x 256) @ (256 x 151,936) output projection, which a batch of rows
shares instead of reading the 155 MB weight once per token.

Throughput counts generated tokens (up to and including EOS; a random model rarely
emits it): tokens/s = generated tokens / wall seconds of the whole call or loop,
tokenization included. The baseline runs on `--baseline-prompts` of the prompts (every
k-th, so lengths stay representative) because it is slow; its tokens/s is a rate and
compares directly. Each path is warmed up once before timing. The engine's greedy token
ids are compared with the baseline's on the prompts both ran (float noise from padding
can flip a near-tie on a random model, so this is reported, not asserted). The machine's
load changes during a long run, so `--repeats` rounds each run the baseline and then
every engine batch size, and the medians over rounds are compared.

The sampled case is GRPO's rollout: `--sampled-prompts` (8) questions x `--samples` (8)
samples each at temperature 1 (top-p 1, no top-k), up to `--max-new-tokens`, all 64 rows
in one batch, three runs per round:

* hf_sampled: the engine's sampling path before it drew tokens itself: one left-padded
  `model.generate(do_sample=True, top_k=0, num_return_sequences=8)` call with the
  engine's per-step entropy recorder as its logits processor (`torch.multinomial` over
  the full vocabulary at each step).
* engine_sampled: `generate(..., temperature=1.0, n=8)` (entropy recorded).
* engine_sampled_no_entropy: the same with `record_entropy=False`, as GRPO rollouts can
  run (the entropy is also available from the training pass).

Usage:
    python benchmarks/generation.py [--data PATH] [--num-prompts 128]
        [--max-new-tokens 64] [--batch-sizes 64 128] [--baseline-prompts 16]
        [--repeats 2] [--threads 2] [--cases greedy sampled]
        [--sampled-prompts 8] [--samples 8]

Prints one JSON line per run and a summary line: the engine's speedup over the
baseline for each batch size, and whether the best one meets the 8x target; for the
sampled case, each run's tokens/s and its speedup over hf_sampled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import load_average, vocab_case_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
TARGET_SPEEDUP = 8.0
MAX_POSITIONS = 512  # as train_throughput's models; every prompt + 64 tokens fits


def read_questions(path: Path, count: int) -> list[str]:
    """The first `count` `question` fields of a JSONL file."""
    questions = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                questions.append(json.loads(line)["question"])
            if len(questions) == count:
                return questions
    raise SystemExit(f"{path} has {len(questions)} questions; the benchmark needs {count}")


def build_model_and_tokenizer() -> tuple[Any, Any]:
    """train_throughput's "vocab" case, built in memory."""
    from posttrain.models.tiny import build_qwen_tokenizer

    return vocab_case_model(MAX_POSITIONS, seed=0).eval(), build_qwen_tokenizer()


def baseline(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int
) -> list[list[int]]:
    """One `model.generate` call per prompt; the generated ids of each, cut after EOS."""
    eos = tokenizer.eos_token_id
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt")
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = output[0, encoded["input_ids"].shape[1] :].tolist()
            results.append(new[: new.index(eos) + 1] if eos in new else new)
    return results


def hf_sampled(
    model: Any, tokenizer: Any, prompts: list[str], n: int, max_new_tokens: int, seed: int
) -> list[list[int]]:
    """The engine's previous sampling path: one left-padded `model.generate(do_sample=True)`
    call for every prompt x `n`, the entropy recorded per step; generated ids cut after EOS,
    (len(prompts) * n) rows."""
    from posttrain.generation.sampling import EntropyRecorder as _EntropyRecorder

    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, ids in enumerate(encoded):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        attention_mask[r, width - len(ids) :] = 1
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_return_sequences=n,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=[_EntropyRecorder()],
        )
    rows = output[:, width:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def run_sampled(model: Any, tokenizer: Any, prompts: list[str], run: str, args: Any) -> dict:
    """Time one sampled run of the `prompts` x `args.samples` rollout batch; its row."""
    from posttrain.generation.decode import generate

    def engine(record_entropy: bool) -> list[list[int]]:
        samples = generate(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=1.0,
            n=args.samples, seed=0, batch_size=len(prompts), record_entropy=record_entropy,
        )  # fmt: skip
        return [s.token_ids for group in samples for s in group]

    calls = {
        "hf_sampled": lambda: hf_sampled(
            model, tokenizer, prompts, args.samples, args.max_new_tokens, seed=0
        ),
        "engine_sampled": lambda: engine(True),
        "engine_sampled_no_entropy": lambda: engine(False),
    }
    ids, seconds = _timed(calls[run])
    tokens = sum(len(row) for row in ids)
    return {
        "run": run,
        "prompts": len(prompts),
        "samples": args.samples,
        "generated_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
    }


SAMPLED_RUNS = ("hf_sampled", "engine_sampled", "engine_sampled_no_entropy")


def _timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def run_baseline(model: Any, tokenizer: Any, prompts: list[str], args: Any) -> dict[str, Any]:
    """Time the one-prompt-at-a-time loop; its row, with the generated ids under "ids"."""
    ids, seconds = _timed(lambda: baseline(model, tokenizer, prompts, args.max_new_tokens))
    tokens = sum(len(row) for row in ids)
    return {
        "run": "baseline",
        "prompts": len(prompts),
        "generated_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
        "ids": ids,
    }


def run_engine(
    model: Any, tokenizer: Any, prompts: list[str], batch_size: int, args: Any
) -> dict[str, Any]:
    """Time one `generate` call over every prompt; its row, with the samples' ids."""
    from posttrain.generation.decode import generate

    samples, seconds = _timed(
        lambda: generate(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch_size
        )
    )
    flat = [s[0] for s in samples]
    tokens = sum(s.num_tokens for s in flat)
    return {
        "run": "engine",
        "batch_size": batch_size,
        "prompts": len(prompts),
        "generated_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
        "eos_stops": sum(s.finish_reason == "eos" for s in flat),
        "ids": [s.token_ids for s in flat],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSONL")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--baseline-prompts", type=int, default=16, help="every k-th prompt")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; medians are compared")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cases", nargs="+", choices=["greedy", "sampled"], default=None)
    parser.add_argument("--sampled-prompts", type=int, default=8, help="sampled case: questions")
    parser.add_argument("--samples", type=int, default=8, help="sampled case: samples each")
    args = parser.parse_args()
    cases = args.cases or ["greedy", "sampled"]
    sys.path.insert(0, str(ROOT))
    from posttrain.generation.decode import generate

    torch.set_num_threads(args.threads)
    prompts = read_questions(args.data, args.num_prompts)
    model, tokenizer = build_model_and_tokenizer()
    stride = max(1, len(prompts) // max(1, args.baseline_prompts))
    base_index = list(range(0, len(prompts), stride))[: args.baseline_prompts]
    common = {"threads": args.threads, "max_new_tokens": args.max_new_tokens}

    # Warm-up: first calls pay for allocations and lazy initialisation.
    baseline(model, tokenizer, prompts[:1], 4)
    generate(model, tokenizer, prompts[:4], max_new_tokens=4, batch_size=4)
    if "sampled" in cases:
        generate(model, tokenizer, prompts[:2], max_new_tokens=4, temperature=1.0, n=2)
        hf_sampled(model, tokenizer, prompts[:2], 2, 4, seed=0)

    rates: dict[str, list[float]] = {}
    sampled_rates: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        # Rounds alternate baseline and engine runs, so that a change in the machine's
        # load falls on both.
        if "sampled" in cases:
            for run in SAMPLED_RUNS:
                row = run_sampled(model, tokenizer, prompts[: args.sampled_prompts], run, args)
                sampled_rates.setdefault(run, []).append(row["tokens_per_s"])
                line = row | {"repeat": repeat, **common, "load": load_average()}
                print(json.dumps(line), flush=True)
        if "greedy" not in cases:
            continue
        base = run_baseline(model, tokenizer, [prompts[i] for i in base_index], args)
        rows = [base] + [run_engine(model, tokenizer, prompts, b, args) for b in args.batch_sizes]
        base_ids = base["ids"]
        for row in rows:
            key = row["run"] if row["run"] == "baseline" else f"engine_b{row['batch_size']}"
            rates.setdefault(key, []).append(row["tokens_per_s"])
            if row["run"] == "engine":
                pairs = zip(base_index, base_ids, strict=True)
                same = sum(row["ids"][i] == ids for i, ids in pairs)
                row["same_ids_as_baseline"] = f"{same}/{len(base_index)}"
            del row["ids"]
            print(
                json.dumps(row | {"repeat": repeat, **common, "load": load_average()}), flush=True
            )

    model_name = "qwen2 h256 l4 v151936 tied, Qwen2.5 tokenizer, fp32, random weights"
    if sampled_rates:
        medians = {k: statistics.median(r) for k, r in sampled_rates.items()}
        sampled = {
            "model": model_name,
            "work": (
                f"sampled at temperature 1: {args.sampled_prompts} GSM8K questions x "
                f"{args.samples}, <= {args.max_new_tokens} new tokens, one batch; "
                f"median of {args.repeats} rounds"
            ),
            "tokens_per_s": {k: round(v, 2) for k, v in medians.items()},
            "speedup_over_hf_sampled": {
                k: round(v / medians["hf_sampled"], 2) for k, v in medians.items()
            },
            "load": load_average(),
        }
        print(json.dumps(sampled), flush=True)
    if "greedy" not in cases:
        return
    base_rate = statistics.median(rates.pop("baseline"))
    speedups = {key: statistics.median(r) / base_rate for key, r in rates.items()}
    best = max(speedups, key=lambda k: speedups[k])
    summary = {
        "model": model_name,
        "work": (
            f"greedy, <= {args.max_new_tokens} new tokens for each of {len(prompts)} GSM8K "
            f"questions (baseline: {len(base_index)} of them, one at a time); "
            f"median of {args.repeats} rounds"
        ),
        "baseline_tokens_per_s": round(base_rate, 2),
        "engine_tokens_per_s": {k: round(statistics.median(r), 2) for k, r in rates.items()},
        "speedup": {k: round(v, 2) for k, v in speedups.items()},
        "best": best,
        "target_speedup": TARGET_SPEEDUP,
        "target_met": speedups[best] >= TARGET_SPEEDUP,
        "load": load_average(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
