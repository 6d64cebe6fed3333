"""`posttrain eval`: does the model get the answers right? Generate answers to the
questions of a data file, score them with a reward function, write and print a summary.

Writes `summary.json` (the metrics, and the settings under "config") and
`generations.jsonl` (one row per sample) into `--output-dir`. Under torchrun every rank
generates its share and rank 0 writes and prints; the result is the same as one process's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from posttrain.cli.common import check_data_path, check_model_dir
from posttrain.config.eval import EVAL_SPEC, EvalConfig

ARTIFACTS = ("summary.json", "generations.jsonl")
NUM_EXAMPLES = 3
# Off a terminal, progress lines are printed at most this often.
STATUS_EVERY_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate answers to the questions of a data file with a saved model, score them "
        "against the gold answers with a reward (gsm8k, math, r1_zero, mmlu, exact or your "
        "own), and write summary.json and generations.jsonl. Example: posttrain eval "
        "--model RUN/final --data gsm8k_test.jsonl --reward gsm8k --prompt-field question"
    )
    EVAL_SPEC.add_arguments(parser)


# --------------------------------------------------------------------------- loading


def _load_model(cfg: EvalConfig, info: Any) -> tuple[Any, Any]:
    import torch

    from posttrain.engine.checkpoints import load_pretrained
    from posttrain.generation.decode import resolve_device

    # Under torchrun each rank uses the device init_distributed gave it.
    device = info.device if info.is_distributed else resolve_device(cfg.device)
    model, tokenizer = load_pretrained(cfg.model)
    if device.type == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
        # Half-precision matmuls on a CPU are slow or missing; a GPU keeps the model's dtype.
        model = model.float()
    model.to(device).eval()
    return model, tokenizer


def _stop_token_ids(cfg: EvalConfig, model: Any, tokenizer: Any) -> list[int]:
    from posttrain.data.tokenized import end_of_turn_token_ids

    # The chat template's end-of-turn token (<|im_end|>) as well as EOS: a chat model
    # ends its answer with the former.
    ids = end_of_turn_token_ids(tokenizer)
    if not ids and model.generation_config.eos_token_id is None:
        raise ValueError(
            f"the model in {cfg.model} has no EOS token (neither its tokenizer nor its "
            "generation config defines one), so answers could not end before max_new_tokens"
        )
    return ids


def _main_first(info: Any, step: Callable[[], None]) -> None:
    """Run `step` on rank 0 only; a failure there stops every rank with its message
    (the others would otherwise wait in the first collective for ever)."""
    from posttrain.common.distributed import broadcast_object

    error: Exception | None = None
    if info.is_main:
        try:
            step()
        except Exception as exc:
            error = exc
    message = broadcast_object(None if error is None else str(error), info)
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(f"rank 0: {message}")


# --------------------------------------------------------------------------- output


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A `progress(done, total)` callback: a rich bar on a terminal (stderr), else a plain
    line at most every `STATUS_EVERY_S` seconds; None when disabled."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        last = [time.monotonic()]

        def plain(done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= STATUS_EVERY_S:
                last[0] = now
                print(f"eval: {done}/{total} prompts", file=sys.stderr, flush=True)

        yield plain
        return
    from posttrain.engine.metrics import progress_bar

    bar = progress_bar("prompts", sys.stderr)
    task = bar.add_task("eval", total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _print_summary(summary: dict[str, Any]) -> None:
    from posttrain.evaluation.answers import format_summary_table, format_value

    if not sys.stdout.isatty():
        print(format_summary_table(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="posttrain eval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, format_value(key, value))
    Console().print(table)


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return repr(text)
    return repr("..." + text[-limit:]) if keep_end else repr(text[:limit] + "...")


def _print_examples(samples: list[dict[str, Any]]) -> None:
    firsts = [s for s in samples if s["sample"] == 0][:NUM_EXAMPLES]
    print("examples:")
    for s in firsts:
        print(
            f"  [{s['index']}] prompt:   {_clip(s['prompt'], 160, keep_end=True)}\n"
            f"      response: {_clip(s['response'], 300)} ({s['num_tokens']} tokens, "
            f"{s['finish_reason']})\n"
            f"      gold:     {_clip(s['gold'], 120)}\n"
            f"      reward {s['reward']:g} (format {s['format_reward']:g}, "
            f"answer {s['answer_reward']:g})"
        )


# --------------------------------------------------------------------------- run


def _evaluate(cfg: EvalConfig, info: Any) -> Any:
    from posttrain.engine.run_dir import prepare_output_dir
    from posttrain.evaluation.answers import evaluate_answers, load_eval_data
    from posttrain.generation.prompts import build_prompts, load_template
    from posttrain.rewards import get_reward_fn

    # Every input is checked before the model is loaded, which can take minutes.
    template = load_template(cfg.prompt_template)
    reward_fn = get_reward_fn(cfg.reward)
    data = load_eval_data(
        cfg.data, cfg.prompt_field, cfg.answer_field, cfg.limit, reward_fn=reward_fn
    )
    _main_first(
        info,
        lambda: prepare_output_dir(cfg.output_dir, ARTIFACTS, overwrite=cfg.overwrite, resume=None),
    )
    model, tokenizer = _load_model(cfg, info)
    stop_ids = _stop_token_ids(cfg, model, tokenizer)
    prompts, template_stops = build_prompts(tokenizer, data.questions, template, cfg.chat)
    with _progress_bar(cfg.progress and info.is_main) as progress:
        return evaluate_answers(
            model,
            tokenizer,
            prompts,
            data.golds,
            reward_fn,
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            stop=template_stops if cfg.stop is None else tuple(cfg.stop),
            stop_token_ids=stop_ids,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            info=info,
            progress=progress,
        )


def check_before_torch(cfg: EvalConfig) -> None:
    """Paths, the reward and the output directory, checked before torch is imported (the
    data's rows and the template follow, still before the model loads)."""
    from posttrain.engine.run_dir import check_output_dir
    from posttrain.rewards import get_reward_fn

    check_model_dir(cfg.model)
    check_data_path(cfg.data, "--data")
    get_reward_fn(cfg.reward)
    check_output_dir(cfg.output_dir, ARTIFACTS, overwrite=cfg.overwrite, resume=None)


def run(args: argparse.Namespace) -> int:
    cfg = EVAL_SPEC.from_args(args)
    check_before_torch(cfg)
    from pathlib import Path

    from posttrain.common.distributed import init_distributed, shutdown
    from posttrain.evaluation.answers import write_generations

    info = init_distributed()
    try:
        result = _evaluate(cfg, info)
    finally:
        shutdown(info)
    if not info.is_main:
        return 0  # under torchrun, rank 0 speaks for the run
    out = Path(cfg.output_dir)
    summary_file = out / "summary.json"
    summary_file.write_text(
        json.dumps({**result.summary, "config": dataclasses.asdict(cfg)}, indent=2) + "\n",
        encoding="utf-8",
    )
    generations = write_generations(out / "generations.jsonl", result.samples)
    _print_summary(result.summary)
    _print_examples(result.samples)
    print(f"summary:     {summary_file}\ngenerations: {generations}")
    return 0
