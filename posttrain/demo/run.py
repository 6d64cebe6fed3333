"""`posttrain demo`: the whole tool, end to end, on a CPU in a few minutes with no download.

It writes the word-reversal task of `posttrain.demo.task` as JSONL, trains a
character-level tokenizer on it, builds a ~0.5M-parameter Llama with random weights,
fine-tunes it with `posttrain.sft.train.train` (the code path of `posttrain sft`), and
scores held-out exact-match accuracy by greedy generation before, during and after
training, through the evaluation path of `posttrain eval` (`answer_eval`, reward `exact`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain.common.jsonl import read_jsonl, write_jsonl
from posttrain.config import SFTConfig
from posttrain.data.tokenized import end_of_turn_token_ids
from posttrain.demo.task import (
    DEFAULT_MAX_STEPS,
    DEFAULT_OUTPUT_DIR,
    MAX_LETTERS,
    NUM_EVAL,
    RL_DIR,
    SFT_DIR,
    DemoError,
    DemoSettings,
    make_reversal_examples,
    reversal_prompt,
)
from posttrain.engine import run_dir
from posttrain.engine.checkpoints import quiet_hf_progress
from posttrain.engine.setup import RUN_ARTIFACTS
from posttrain.evaluation.answers import EvalResult, evaluate_answers
from posttrain.generation.decode import load_model_and_tokenizer
from posttrain.models.tiny import tiny_causal_lm
from posttrain.rewards import get_reward_fn
from posttrain.sft.train import train

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
BASE_MODEL_DIR = "base_model"
SUMMARY_FILE = "summary.json"
# "stressed" reversed is "desserts": the word the summary suggests trying.
TRY_WORD = "stressed"

# The file the demo writes first, with the demo's settings.
MARKER_FILE = "demo_config.json"
# Everything a demo run writes into its directory; --overwrite deletes only these.
DEMO_ARTIFACTS = (
    MARKER_FILE,
    TRAIN_FILE,
    EVAL_FILE,
    BASE_MODEL_DIR,
    SUMMARY_FILE,
    SFT_DIR,
    RL_DIR,
    *RUN_ARTIFACTS,
)


def train_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose vocabulary is the characters seen in `texts`.

    One token per character keeps the reversal task a pure copy-by-position problem,
    and makes tokenize(prompt) + tokenize(response) equal tokenize(prompt + response),
    so the trainer's prompt/response boundary is exact. It adds no BOS; EOS is `</s>`,
    the pad `<pad>`, and unseen characters become `<unk>`.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    # [\s\S] rather than ".": the regex engine's "." skips newlines.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK], show_progress=False)
    # Sorted unique characters, so the vocabulary (ids) doesn't depend on frequencies.
    chars = sorted({c for text in texts for c in text})
    tok.train_from_iterator(chars, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=1024,
    )


def build_base_model(tokenizer: PreTrainedTokenizerFast, settings: DemoSettings) -> PreTrainedModel:
    """A randomly initialised Llama/Qwen2 sized for the task, with the tokenizer's special ids."""
    model = tiny_causal_lm(
        settings.arch,
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=128,
        seed=settings.seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    # So that plain `model.generate(...)` on the saved model stops at EOS too.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Make `output_dir` empty, refusing to mix runs or to delete what isn't a demo run."""
    try:
        run_dir.prepare_output_dir(
            output_dir, DEMO_ARTIFACTS, overwrite=overwrite, resume=None, exclusive=True
        )
    except ValueError as exc:
        raise DemoError(str(exc)) from None


def write_task_files(output_dir: Path, settings: DemoSettings) -> tuple[Path, Path]:
    """Write DIR/train.jsonl and DIR/eval.jsonl; return their paths."""
    train_rows, eval_rows = make_reversal_examples(
        settings.num_train, settings.num_eval, settings.seed
    )
    train_path, eval_path = output_dir / TRAIN_FILE, output_dir / EVAL_FILE
    write_jsonl(train_path, train_rows)
    write_jsonl(eval_path, eval_rows)
    return train_path, eval_path


def sft_config_for(
    settings: DemoSettings,
    output_dir: Path,
    base_dir: Path,
    progress: bool,
    run_dir: Path | None = None,
) -> SFTConfig:
    """The `posttrain sft` settings of the demo's fine-tuning run: data from `output_dir`,
    the run written to `run_dir` (default: `output_dir` itself)."""
    return SFTConfig(
        model=str(base_dir),
        train_file=str(output_dir / TRAIN_FILE),
        eval_file=str(output_dir / EVAL_FILE),
        output_dir=str(run_dir or output_dir),
        # The longest example is 26 prompt + 8 answer + 1 EOS tokens.
        max_seq_len=64,
        micro_batch_size=settings.micro_batch_size,
        grad_accum_steps=1,
        # Batches mixing all word lengths: with length grouping each batch holds one
        # length, and seed 2 reached only 78% after 400 steps (100% without).
        group_by_length=False,
        max_steps=settings.max_steps,
        lr=settings.lr,
        lr_scheduler="cosine",
        warmup_steps=min(settings.warmup_steps, max(settings.max_steps // 10, 1)),
        min_lr_ratio=0.1,
        max_grad_norm=1.0,
        seed=settings.seed,
        precision="auto",
        log_every=max(1, min(10, settings.max_steps // 50)),
        # 200 held-out examples take a fraction of a second: a dozen points on the plot.
        eval_every=max(1, settings.max_steps // 12),
        # The held-out accuracy curve, through the path of `posttrain eval`.
        eval_generate_file=str(output_dir / EVAL_FILE),
        eval_generate_every=max(1, settings.max_steps // 12),
        eval_generate_limit=None,
        eval_max_new_tokens=MAX_LETTERS + 1,
        reward="exact",
        # One checkpoint halfway, as a longer run would keep several.
        save_every=max(1, settings.max_steps // 2),
        keep_last=2,
        num_threads=settings.num_threads,
        progress=progress,
    )


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with `num_threads` intra-op threads, then restore the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score_held_out(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    answers: list[str],
    *,
    n: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> EvalResult:
    """Answers to the held-out prompts scored by exact match, as `posttrain eval
    --reward exact --max-new-tokens 9` scores them (room for 8 letters and the EOS):
    greedy by default, else `n` samples per prompt at `temperature` (summary["mean@n"])."""
    return evaluate_answers(
        model,
        tokenizer,
        prompts,
        answers,
        get_reward_fn("exact"),
        n=n,
        temperature=temperature,
        seed=seed,
        max_new_tokens=MAX_LETTERS + 1,
        stop_token_ids=end_of_turn_token_ids(tokenizer),
        # About 256 sequences per generate call, whatever n is.
        batch_size=max(1, 256 // n),
    )


def run_demo(
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    seed: int = 0,
    max_steps: int = DEFAULT_MAX_STEPS,
    overwrite: bool = False,
    progress: bool = True,
    num_eval: int = NUM_EVAL,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the demo into `output_dir`; return (and write to DIR/summary.json) its summary.

    `echo` receives a line per stage (None: silent); the trainer's own progress bar
    and log lines appear as in `posttrain sft`.
    """
    check_steps("--max-steps", max_steps)
    check_seed(seed)
    settings = DemoSettings(seed=seed, max_steps=max_steps, num_eval=num_eval)
    out = Path(output_dir)
    say = echo or (lambda _line: None)
    return run_in_demo_dir(
        out, settings, settings.num_threads, overwrite, lambda: _run(out, settings, progress, say)
    )


def check_steps(flag: str, steps: int) -> None:
    """DemoError unless `steps` (the value of `flag`) is at least 1."""
    if steps < 1:
        raise DemoError(f"{flag} must be at least 1, got {steps}")


def check_seed(seed: int) -> None:
    """DemoError unless `seed` fits every generator the demo seeds."""
    if not 0 <= seed < 2**32:
        raise DemoError(f"--seed must be in [0, 2**32), got {seed}")


def run_in_demo_dir(
    out: Path,
    settings: Any,
    num_threads: int,
    overwrite: bool,
    body: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Prepare `out`, record `settings` (a dataclass) in it, run `body` on `num_threads`
    torch threads, and write its summary (with total_seconds) to DIR/summary.json."""
    started = time.monotonic()
    prepare_output_dir(out, overwrite)
    (out / MARKER_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n")
    # One thread: this model is too small for a second one to pay, and on a machine
    # whose other core is busy, two threads ran 2-3x slower than one.
    with torch_threads(num_threads), quiet_hf_progress():
        summary = body()
    summary["total_seconds"] = time.monotonic() - started
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class DemoTask:
    """The demo's data and starting point, as `set_up_task` wrote them: the task files,
    the held-out prompts and answers (strings), and the random base model (float32) with
    its character tokenizer, saved to `base_dir`."""

    train_path: Path
    eval_path: Path
    prompts: list[str]
    answers: list[str]
    base_dir: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast


def set_up_task(out: Path, settings: DemoSettings, say: Callable[[str], None]) -> DemoTask:
    """Write the task files, train the tokenizer, build and save the random base model."""
    train_path, eval_path = write_task_files(out, settings)
    train_rows = [row for _, row in read_jsonl(train_path)]
    eval_rows = [row for _, row in read_jsonl(eval_path)]
    say(
        f"task: word reversal, e.g. {eval_rows[0]['prompt']!r} -> {eval_rows[0]['response']!r}\n"
        f"  data: {train_path} ({len(train_rows)} examples), "
        f"{eval_path} ({len(eval_rows)} held out)"
    )
    tokenizer = train_char_tokenizer(r["prompt"] + r["response"] for r in train_rows)
    model = build_base_model(tokenizer, settings)
    base_dir = out / BASE_MODEL_DIR
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    num_params = sum(p.numel() for p in model.parameters())
    say(
        f"model: {settings.arch} with random weights, {num_params / 1e6:.2f}M parameters, "
        f"{len(tokenizer)}-token character vocabulary -> {base_dir}"
    )
    return DemoTask(
        train_path=train_path,
        eval_path=eval_path,
        prompts=[r["prompt"] for r in eval_rows],
        answers=[r["response"] for r in eval_rows],
        base_dir=base_dir,
        model=model,
        tokenizer=tokenizer,
    )


def _run(
    out: Path, settings: DemoSettings, progress: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    task = set_up_task(out, settings, say)
    prompts, answers = task.prompts, task.answers
    before = score_held_out(task.model, task.tokenizer, prompts, answers)
    accuracy_before = before.summary["accuracy"]
    say(f"held-out exact match before training: {accuracy_before:.1%}")

    say(f"fine-tuning for {settings.max_steps} steps (the `posttrain sft` trainer)")
    result = train(sft_config_for(settings, out, task.base_dir, progress))

    # Score the saved model, not the in-memory one: that is what a user gets.
    trained, trained_tokenizer = load_model_and_tokenizer(result.final_model_dir, "cpu")
    after = score_held_out(trained, trained_tokenizer, prompts, answers)
    accuracy_after = after.summary["accuracy"]
    predictions = [row["response"] for row in after.samples]
    return {
        "task": "word reversal",
        "seed": settings.seed,
        "steps": result.steps,
        "num_eval": len(prompts),
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "final_loss": result.final_loss,
        "train_seconds": result.train_seconds,
        "model_dir": str(result.final_model_dir),
        "metrics_path": str(result.metrics_path),
        "plot_path": str(result.plot_path) if result.plot_path else None,
        "train_file": str(task.train_path),
        "eval_file": str(task.eval_path),
        "examples": example_rows(prompts, answers, predictions),
    }


def example_rows(
    prompts: list[str], answers: list[str], predictions: list[str], count: int = 5
) -> list[dict[str, str]]:
    """The first `count` held-out prompts with their expected and generated answers."""
    return [
        {"prompt": p, "expected": a, "generated": g}
        for p, a, g in list(zip(prompts, answers, predictions, strict=True))[:count]
    ]


def format_summary(summary: dict[str, Any], output_dir: str | Path) -> str:
    """The report printed at the end of `posttrain demo`."""
    lines = [
        "",
        "posttrain demo: done",
        f"  held-out exact match: {summary['accuracy_before']:.1%} before training -> "
        f"{summary['accuracy_after']:.1%} after ({summary['num_eval']} unseen words)",
        f"  final training loss:  {summary['final_loss']:.4f}",
        f"  time: {summary['train_seconds']:.0f}s training, {summary['total_seconds']:.0f}s in all",
        f"  model:   {summary['model_dir']}",
        f"  metrics: {summary['metrics_path']}",
    ]
    if summary.get("plot_path"):
        lines.append(f"  plot:    {summary['plot_path']}")
    lines.append(f"  summary: {Path(output_dir) / SUMMARY_FILE}")
    return "\n".join(lines + closing_lines(summary))


def closing_lines(summary: dict[str, Any]) -> list[str]:
    """The end of a demo's report: three held-out examples and how to try the model."""
    lines = ["  examples:"]
    for ex in summary["examples"][:3]:
        mark = "ok" if ex["generated"] == ex["expected"] else "WRONG"
        lines.append(f"    {ex['prompt']!r} -> {ex['generated']!r} ({mark})")
    return [
        *lines,
        "",
        "Try it on a word of your own (lowercase, 3 to 8 letters):",
        f"  posttrain generate --model {summary['model_dir']} "
        f'--prompt "{reversal_prompt(TRY_WORD)}"',
    ]
