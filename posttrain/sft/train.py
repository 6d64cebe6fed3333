"""The SFT training loop: `train(config)`, the function behind `posttrain sft`.

`train` prepares a `Run` (model, loss, optimizer, schedule, data plan, output
directory), restores it from a checkpoint when resuming, then loops: per optimizer step
it accumulates the gradients of the step's micro-batches, takes the optimizer step, and
logs, evaluates and checkpoints when each is due. `finish` saves the final model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from posttrain.common.devices import autocast, to_device
from posttrain.common.distributed import (
    DistInfo,
    barrier,
    full_model_state_dict,
    full_optimizer_state_dict,
    init_distributed,
    is_fsdp,
    shutdown,
)
from posttrain.config import SFTConfig, config_to_dict
from posttrain.data.batching import (
    collate,
    rank_micro_batches,
)
from posttrain.engine.checkpoints import (
    FINAL_DIR,
    checkpoint_dir,
    latest_checkpoint,
    save_checkpoint,
    save_final_model,
)
from posttrain.engine.interrupts import StopRequest
from posttrain.engine.metrics import (
    METRICS_FILE,
    MetricsLogger,
    ProgressReporter,
    plot_metrics,
)
from posttrain.engine.run import (
    PLOT_FILE,
    Run,
    TrainResult,
    epoch_plan,
    prepare_run,
)
from posttrain.evaluation.held_out_loss import evaluate_loss
from posttrain.evaluation.hooks import GenerationEval, prepare_generation_eval, run_generation_eval
from posttrain.models.policy import StepStats, loss_weights, step_denominator

logger = logging.getLogger("posttrain")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says what to do."""

    user_facing = True


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after step `step`; `checkpoint` holds it."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted by signal {signum} after step {step}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- the loop


def train(config: SFTConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.train_file`; return where the results are."""
    info = init_distributed()
    try:
        return _train(config, info)
    finally:
        shutdown(info)


def _train(config: SFTConfig, info: DistInfo) -> TrainResult:
    run = prepare_run(config, info)
    if isinstance(run, TrainResult):
        return run  # a finished run, resumed: nothing to do
    generation_eval = _generation_eval(config, run)
    metrics = MetricsLogger(
        run.out,
        config_to_dict(config),
        enabled=info.is_main,
        resume_step=run.start_step if run.resumed else None,
    )
    progress = ProgressReporter(run.total_steps, enabled=info.is_main and config.progress)
    final_loss = float("nan")
    started = time.monotonic()
    with StopRequest() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(metrics.close)
        cleanup.callback(progress.close)
        for step in range(run.start_step, run.total_steps):
            done = step + 1
            step_started = time.monotonic()
            batches = step_batches(run, step, config)
            stats = accumulate_gradients(
                run.loss_module, batches, config.loss_normalization, info, run.autocast_dtype
            )
            total = stats.all_reduced(info)
            check_finite(total.loss, done, run.out)
            grad_norm, lr = optimizer_step(run, config.max_grad_norm)
            final_loss = total.loss
            row = None
            if due(done, config.log_every, run.total_steps):
                seconds = time.monotonic() - step_started
                row = step_metrics(total, lr, grad_norm, seconds, step / len(run.plan))
                metrics.log(done, row)
            progress.update(done, row)
            if run.eval_examples and due(done, config.eval_every, run.total_steps):
                row = evaluate_loss(
                    run.loss_module,
                    run.eval_examples,
                    config.micro_batch_size,
                    run.pad_id,
                    info,
                    run.autocast_dtype,
                    on_batch=progress.status,
                )
                metrics.log(done, row)
                progress.update(done, row)
            if generation_eval and due(done, config.eval_generate_every, run.total_steps):
                # Generation's caches need the memory more than the next step needs to
                # skip the page faults of fresh loss buffers.
                run.head_workspace.release()
                row = run_generation_eval(
                    generation_eval,
                    run.model,
                    run.tokenizer,
                    run.loss_module,
                    info,
                    done,
                    run.autocast_dtype,
                    progress.status,
                )
                metrics.log(done, row)
                progress.update(done, row)
            saved = due(done, config.save_every, run.total_steps, at_end=False)
            if saved:
                save_step(run, done, config)
            if (signum := stop.agreed(info)) and done < run.total_steps:
                checkpoint = save_step(run, done, config) if not saved else None
                raise TrainingInterrupted(signum, done, checkpoint or latest_checkpoint(run.out))
    return finish(run, config, final_loss, time.monotonic() - started)


def _generation_eval(config: SFTConfig, run: Run) -> GenerationEval | None:
    """The run's generation evaluation, prepared (and announced) before the first step."""
    if config.eval_generate_file is None or config.reward is None:
        return None
    spec = prepare_generation_eval(
        config.eval_generate_file,
        run.tokenizer,
        prompt_field=config.eval_prompt_field or config.prompt_field,
        answer_field=config.eval_answer_field or config.response_field,
        limit=config.eval_generate_limit,
        template=config.eval_prompt_template,
        reward=config.reward,
        max_new_tokens=config.eval_max_new_tokens,
        out_dir=run.out,
    )
    if run.info.is_main:
        every = config.eval_generate_every
        logger.info(
            "generation evaluation: greedy answers to %d prompts of %s scored with %r, %s",
            len(spec.prompts),
            config.eval_generate_file,
            config.reward,
            f"every {every} steps and at the end" if every else "at the end",
        )
    return spec


def due(done: int, every: int | None, total: int, at_end: bool = True) -> bool:
    """Whether a component that runs every `every` steps (0/None: not periodically) runs
    after step `done`; after the last step it runs if and only if `at_end`."""
    if done == total:
        return at_end
    return bool(every) and done % every == 0


# --------------------------------------------------------------------------- the phases


def step_batches(run: Run, step: int, config: SFTConfig) -> list[dict[str, Tensor]]:
    """This rank's micro-batches of optimizer step `step` (0-based), on the device."""
    epoch, index = divmod(step, len(run.plan))
    if epoch not in run.plans:
        run.plans.clear()
        run.plans[epoch] = epoch_plan(run.train_examples, config, run.info, epoch)
    info = run.info
    micro = rank_micro_batches(
        run.plans[epoch][index], config.micro_batch_size, info.world_size, info.rank
    )
    examples = run.train_examples
    return [
        to_device(collate([examples[i] for i in ids], run.pad_id), info.device) for ids in micro
    ]


def accumulate_gradients(
    loss_module: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    normalization: str,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
) -> StepStats:
    """Forward and backward every micro-batch of one optimizer step on this rank.

    Gradients add up in the parameters' `.grad`; with `token` normalisation they equal
    the gradient of the mean response-token loss over the whole global step, on one
    process or on many.
    """
    denominator = step_denominator(batches, normalization, info)
    stats = StepStats()
    for i, batch in enumerate(batches):
        weights = loss_weights(batch["response_mask"], normalization, denominator)
        # DDP all-reduces gradients on the last micro-batch only.
        sync = i == len(batches) - 1 or not hasattr(loss_module, "no_sync")
        context = loss_module.no_sync() if not sync else contextlib.nullcontext()
        with context, autocast(info.device, autocast_dtype):
            out = loss_module(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                weights.to(info.device),
            )
        # The weights already divide by the global count, so the step's gradient is the
        # sum over ranks; DDP and FSDP average over ranks, which this factor undoes.
        (out.loss * info.world_size if info.is_distributed else out.loss).backward()
        stats.add(out, batch)
    return stats


def check_finite(loss: float, done: int, out: Path) -> None:
    """Stop before applying the update of a step whose loss is not finite."""
    if not math.isfinite(loss):
        last = latest_checkpoint(out)
        raise TrainingError(
            f"the loss became {loss} at step {done}; stopping without applying that "
            f"update. Last good checkpoint: {last if last else 'none'}. Try a lower --lr or "
            "gradient clipping."
        )


def optimizer_step(run: Run, max_grad_norm: float) -> tuple[float, float]:
    """Clip, step, advance the schedule, clear the gradients; returns (grad_norm, lr)."""
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    # Under FSDP the norm is a DTensor; full_tensor() makes it a plain number.
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.head_workspace.forget_casts()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def step_metrics(
    total: StepStats, lr: float, grad_norm: float, seconds: float, epoch: float
) -> dict[str, float]:
    """The metrics line of a training step."""
    return {
        "loss": total.loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "entropy": total.mean_entropy,
        "token_accuracy": total.token_accuracy,
        "tokens_per_s": total.num_input_tokens / seconds,
        "epoch": epoch,
    }


def save_step(run: Run, done: int, config: SFTConfig) -> Path:
    """A checkpoint after step `done`: every rank gathers the state, rank 0 writes it."""
    sharded = is_fsdp(run.loss_module)
    # A LoRA checkpoint is its adapter: only the trainable weights are gathered.
    weights = full_model_state_dict(run.model, sharded, trainable_only=config.lora_r > 0)
    optimizer_state = full_optimizer_state_dict(run.model, run.optimizer)
    if run.info.is_main:
        save_checkpoint(
            run.out,
            done,
            run.model,
            run.tokenizer,
            run.optimizer,
            run.scheduler,
            config,
            extra={
                "epoch": (done - 1) // len(run.plan),
                "data_fingerprint": run.fingerprint,
                "world_size": run.info.world_size,
            },
            model_state_dict=weights,
            optimizer_state=optimizer_state,
        )
    barrier(run.info)
    return checkpoint_dir(run.out, done)


def finish(run: Run, config: SFTConfig, final_loss: float, train_seconds: float) -> TrainResult:
    """Save the final model and plot the metrics (rank 0); every rank gathers the weights.

    A LoRA run writes final/adapter/ and, with `merge_lora`, the merged model in final/.
    """
    final_dir = run.out / FINAL_DIR
    plot_path = None
    lora = config.lora_r > 0
    weights = full_model_state_dict(run.model, is_fsdp(run.loss_module), trainable_only=lora)
    if run.info.is_main:
        final_dir = save_final_model(
            run.out,
            run.model,
            run.tokenizer,
            config,
            model_state_dict=weights,
            step=run.total_steps,
            merge_lora=config.merge_lora,
        )
        metrics_path = run.out / METRICS_FILE
        if metrics_path.exists():
            plot_path = plot_metrics(metrics_path, run.out / PLOT_FILE)
    barrier(run.info)
    return TrainResult(
        final_loss, final_dir, run.out / METRICS_FILE, plot_path, train_seconds, run.total_steps
    )
