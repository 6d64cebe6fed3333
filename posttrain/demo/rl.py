"""`posttrain demo --rl`: the demo's word-reversal model improved by RL, on a CPU, offline.

A short SFT run (the plain demo's recipe, stopped early so that the model still makes
mistakes) writes DIR/sft; GRPO with the `exact` reward then trains that model on its own
samples of the training words (`posttrain.grpo.train.train_grpo`, the code path of
`posttrain grpo`) into DIR/rl. Held-out greedy exact match and mean@N at temperature 1
(the mean over N samples per word of exact match) are scored on the saved SFT model and
on the saved RL model, through the evaluation path of `posttrain eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.config.grpo import GRPOConfig
from posttrain.demo.run import (
    EVAL_FILE,
    SUMMARY_FILE,
    TRAIN_FILE,
    DemoTask,
    check_seed,
    check_steps,
    closing_lines,
    example_rows,
    run_in_demo_dir,
    score_held_out,
    set_up_task,
    sft_config_for,
)
from posttrain.demo.task import (
    DEFAULT_RL_OUTPUT_DIR,
    MAX_LETTERS,
    RL_DIR,
    SFT_DIR,
    RLDemoSettings,
)
from posttrain.generation.decode import load_model_and_tokenizer
from posttrain.grpo.train import train_grpo
from posttrain.sft.train import train

# mean@N is measured at temperature 1: the model's own distribution, unsharpened.
EVAL_TEMPERATURE = 1.0


def grpo_config_for(
    settings: RLDemoSettings, output_dir: Path, start_model: Path, progress: bool
) -> GRPOConfig:
    """The `posttrain grpo` settings of the demo's RL run, from the SFT model `start_model`
    on the demo's training words, into DIR/rl."""
    rollouts = settings.questions_per_step * settings.group_size
    train_batch = rollouts // settings.updates_per_step
    return GRPOConfig(
        model=str(start_model),
        train_file=str(output_dir / TRAIN_FILE),
        output_dir=str(output_dir / RL_DIR),
        reward="exact",
        max_steps=settings.rl_steps,
        lr=settings.lr,
        # A constant rate: the run is short, and a decay only slowed its rise.
        lr_scheduler="constant",
        warmup_steps=0,
        adam_beta2=settings.adam_beta2,
        max_grad_norm=1.0,
        seed=settings.seed,
        precision="auto",
        # One generate call samples the whole rollout batch (the fastest on a CPU).
        rollout_batch_size=rollouts,
        generation_batch_size=rollouts,
        train_batch_size=train_batch,
        micro_batch_size=min(settings.micro_batch_size, train_batch),
        group_size=settings.group_size,
        temperature=settings.temperature,
        # Room for the longest answer (8 letters) and its EOS.
        max_new_tokens=MAX_LETTERS + 1,
        loss_type="reinforce_with_baseline",
        std_normalization=True,
        length_normalization="sequence",
        # The held-out accuracy curve of the plot, through the path of `posttrain eval`.
        eval_generate_file=str(output_dir / EVAL_FILE),
        eval_generate_every=settings.eval_every,
        eval_generate_limit=None,
        eval_max_new_tokens=MAX_LETTERS + 1,
        log_every=1,
        save_every=0,
        num_threads=settings.num_threads,
        progress=progress,
    )


def score_saved_model(
    model_dir: Path, task: DemoTask, settings: RLDemoSettings
) -> tuple[float, float, list[str]]:
    """(greedy exact match, mean@N at temperature 1, the greedy answers) of the
    model saved in `model_dir` on the held-out words: what a user of that directory gets.
    The samples are seeded from the demo's seed, the same for every model scored."""
    model, tokenizer = load_model_and_tokenizer(model_dir, "cpu")
    greedy = score_held_out(model, tokenizer, task.prompts, task.answers)
    n = settings.eval_samples
    sampled = score_held_out(
        model,
        tokenizer,
        task.prompts,
        task.answers,
        n=n,
        temperature=EVAL_TEMPERATURE,
        seed=settings.seed,
    )
    # With n = 1 the summary has no mean@1: its accuracy is the same number.
    mean_at_n = sampled.summary.get(f"mean@{n}", sampled.summary["accuracy"])
    answers = [row["response"] for row in greedy.samples]
    return float(greedy.summary["accuracy"]), float(mean_at_n), answers


def run_rl_demo(
    output_dir: str | Path = DEFAULT_RL_OUTPUT_DIR,
    settings: RLDemoSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the RL demo into `output_dir`; return (and write to DIR/summary.json) its
    summary: accuracy_sft / accuracy_rl (greedy) and mean_at_N_sft / mean_at_N_rl."""
    settings = settings or RLDemoSettings()
    check_steps("--max-steps", settings.sft_steps)
    check_steps("--rl-steps", settings.rl_steps)
    check_seed(settings.seed)
    out = Path(output_dir)
    say = echo or (lambda _line: None)
    return run_in_demo_dir(
        out,
        settings,
        settings.num_threads,
        overwrite,
        lambda: _run_rl(out, settings, progress, say),
    )


def _run_rl(
    out: Path, settings: RLDemoSettings, progress: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    sft_settings = settings.sft()
    task = set_up_task(out, sft_settings, say)
    say(f"SFT for {settings.sft_steps} steps (the `posttrain sft` trainer) -> {out / SFT_DIR}")
    sft = train(sft_config_for(sft_settings, out, task.base_dir, progress, run_dir=out / SFT_DIR))
    accuracy_sft, mean_sft, _ = score_saved_model(sft.final_model_dir, task, settings)
    n = settings.eval_samples
    say(f"held-out after SFT: {accuracy_sft:.1%} greedy, mean@{n} {mean_sft:.1%}")

    say(
        f"GRPO for {settings.rl_steps} steps from {sft.final_model_dir} (the `posttrain grpo` "
        f"trainer, reward exact, {settings.questions_per_step} words x {settings.group_size} "
        f"samples per step) -> {out / RL_DIR}"
    )
    rl = train_grpo(grpo_config_for(settings, out, sft.final_model_dir, progress))
    accuracy_rl, mean_rl, predictions = score_saved_model(rl.final_model_dir, task, settings)
    return {
        "task": "word reversal",
        "seed": settings.seed,
        "sft_steps": sft.steps,
        "rl_steps": rl.steps,
        "num_eval": len(task.prompts),
        "accuracy_sft": accuracy_sft,
        "accuracy_rl": accuracy_rl,
        f"mean_at_{n}_sft": mean_sft,
        f"mean_at_{n}_rl": mean_rl,
        "eval_samples": n,
        "sft_final_loss": sft.final_loss,
        "sft_seconds": sft.train_seconds,
        "rl_seconds": rl.train_seconds,
        "sft_model_dir": str(sft.final_model_dir),
        "model_dir": str(rl.final_model_dir),
        "sft_metrics_path": str(sft.metrics_path),
        "metrics_path": str(rl.metrics_path),
        "plot_path": str(rl.plot_path) if rl.plot_path else None,
        "train_file": str(task.train_path),
        "eval_file": str(task.eval_path),
        "examples": example_rows(task.prompts, task.answers, predictions),
    }


def format_rl_summary(summary: dict[str, Any], output_dir: str | Path) -> str:
    """The report printed at the end of `posttrain demo --rl`."""
    n = summary["eval_samples"]
    lines = [
        "",
        "posttrain demo --rl: done",
        f"  held-out exact match, greedy: {summary['accuracy_sft']:.1%} after SFT -> "
        f"{summary['accuracy_rl']:.1%} after RL ({summary['num_eval']} unseen words)",
        f"  held-out mean@{n} (temperature 1): {summary[f'mean_at_{n}_sft']:.1%} -> "
        f"{summary[f'mean_at_{n}_rl']:.1%}",
        f"  time: {summary['sft_seconds']:.0f}s SFT ({summary['sft_steps']} steps), "
        f"{summary['rl_seconds']:.0f}s RL ({summary['rl_steps']} steps), "
        f"{summary['total_seconds']:.0f}s in all",
        f"  SFT model: {summary['sft_model_dir']}",
        f"  RL model:  {summary['model_dir']}",
        f"  metrics:   {summary['metrics_path']}",
    ]
    if summary.get("plot_path"):
        lines.append(f"  plot:      {summary['plot_path']}")
    lines.append(f"  summary:   {Path(output_dir) / SUMMARY_FILE}")
    return "\n".join(lines + closing_lines(summary))
