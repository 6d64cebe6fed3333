"""The training loop every method runs on: `run_method(method, settings)`.

Prepare (and resume), then per optimizer step: the method's step, its metrics, the
hooks that are due, a checkpoint when due, and a clean stop on SIGINT/SIGTERM after
the step; at the end the final model and the plot.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from posttrain.common.distributed import (
    DistInfo,
    barrier,
    full_model_state_dict,
    full_optimizer_state_dict,
    gather_objects,
    init_distributed,
    is_fsdp,
    shutdown,
)
from posttrain.engine.checkpoints import (
    checkpoint_dir,
    is_complete,
    latest_checkpoint,
    save_checkpoint,
    save_final_model,
)
from posttrain.engine.interrupts import StopRequest
from posttrain.engine.method import Method
from posttrain.engine.metrics import METRICS_FILE, MetricsLogger, ProgressReporter, plot_metrics
from posttrain.engine.rng_state import collect_rng_state
from posttrain.engine.run import Run, StopBeforeStep, TrainingError
from posttrain.engine.settings import RunSettings
from posttrain.engine.setup import PLOT_FILE, TrainResult, prepare_run


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after step `step`; `checkpoint` holds it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by signal {signum} after step {step}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


def run_method(method: Method, settings: RunSettings) -> TrainResult:
    """Train with `method` as `settings` say, on one process or under torchrun."""
    info = init_distributed()
    try:
        return _loop(method, settings, info)
    finally:
        shutdown(info)


def _loop(method: Method, settings: RunSettings, info: DistInfo) -> TrainResult:
    run = prepare_run(method, settings, info)
    if isinstance(run, TrainResult):
        return run  # a finished run, resumed: nothing to do
    method.setup(run)
    hooks = method.hooks(run)
    final_loss = float("nan")
    started = time.monotonic()
    # The handlers go in before metrics.jsonl appears: from then on a SIGTERM or Ctrl-C
    # always ends in a checkpoint and exit 130/143, never in a bare kill.
    with StopRequest() as stop, contextlib.ExitStack() as cleanup:
        metrics = MetricsLogger(
            run.out,
            method.config_dict(),
            enabled=info.is_main,
            resume_step=run.start_step if run.resumed else None,
        )
        cleanup.callback(metrics.close)
        # --no-progress turns the bar into plain lines, as in a log file; rank 0 speaks.
        progress = ProgressReporter(run.total_steps, enabled=info.is_main, bar=settings.progress)
        cleanup.callback(progress.close)
        for step in range(run.start_step, run.total_steps):
            done = step + 1
            try:
                row = method.step(run, step)
            except StopBeforeStep as stop:
                raise _stopped(run, method, step, stop) from stop
            final_loss = row.get("loss", final_loss)
            logged = due(done, settings.log_every, run.total_steps)
            if logged:
                metrics.log(done, row)
            progress.update(done, row if logged else None)
            for hook in hooks:
                if due(done, hook.every, run.total_steps):
                    row = hook(run, done, progress.status)
                    metrics.log(done, row)
                    progress.update(done, row)
            saved = due(done, settings.save_every, run.total_steps, at_end=False)
            if saved:
                save_step(run, method, done)
            if (signum := stop.agreed(info)) and done < run.total_steps:
                checkpoint = save_step(run, method, done) if not saved else None
                raise TrainingInterrupted(signum, done, checkpoint or latest_checkpoint(run.out))
    return finish(run, method, final_loss, time.monotonic() - started)


def _stopped(run: Run, method: Method, finished: int, stop: StopBeforeStep) -> TrainingError:
    """Checkpoint the last finished step (unless it has one) for a step that could not
    run; the error to stop with names the newest checkpoint."""
    if finished > run.start_step and not is_complete(checkpoint_dir(run.out, finished)):
        save_step(run, method, finished)
    last = latest_checkpoint(run.out)
    where = (
        f"checkpoint of step {int(last.name.removeprefix('step-'))}: {last}"
        if last is not None
        else "no checkpoint yet"
    )
    return TrainingError(f"{stop}; stopped before step {finished + 1} ({where})")


def due(done: int, every: int | None, total: int, at_end: bool = True) -> bool:
    """Whether a component that runs every `every` steps (0/None: not periodically) runs
    after step `done`; after the last step it runs if and only if `at_end`."""
    if done == total:
        return at_end
    return bool(every) and done % every == 0


def save_step(run: Run, method: Method, done: int) -> Path:
    """A checkpoint after step `done`: every rank gathers the state, rank 0 writes it."""
    # A LoRA checkpoint is its adapter: only the trainable weights are gathered.
    weights = full_model_state_dict(
        run.model, is_fsdp(run.module), trainable_only=run.settings.lora
    )
    optimizer_state = full_optimizer_state_dict(run.model, run.optimizer)
    rng_per_rank = gather_objects(collect_rng_state(), run.info)
    if run.info.is_main:
        save_checkpoint(
            run.out,
            done,
            run.model,
            run.tokenizer,
            run.optimizer,
            run.scheduler,
            method.config_dict(),
            extra={
                **method.state_dict(),
                "data_fingerprint": method.fingerprint(),
                "world_size": run.info.world_size,
            },
            keep_last=run.settings.keep_last,
            model_state_dict=weights,
            optimizer_state=optimizer_state,
            rng_per_rank=rng_per_rank,
            command=method.command,
        )
    barrier(run.info)
    return checkpoint_dir(run.out, done)


def finish(run: Run, method: Method, final_loss: float, train_seconds: float) -> TrainResult:
    """Save the final model and plot the metrics (rank 0); every rank gathers the weights.

    A LoRA run writes final/adapter/ and, with `merge_lora`, the merged model in final/.
    """
    weights = full_model_state_dict(
        run.model, is_fsdp(run.module), trainable_only=run.settings.lora
    )
    final_dir = run.out / "final"
    plot_path = None
    if run.info.is_main:
        final_dir = save_final_model(
            run.out,
            run.model,
            run.tokenizer,
            method.config_dict(),
            model_state_dict=weights,
            step=run.total_steps,
            merge_lora=run.settings.merge_lora,
            command=method.command,
        )
        metrics_path = run.out / METRICS_FILE
        if metrics_path.exists():
            plot_path = plot_metrics(metrics_path, run.out / PLOT_FILE)
    barrier(run.info)
    return TrainResult(
        final_loss, final_dir, run.out / METRICS_FILE, plot_path, train_seconds, run.total_steps
    )
