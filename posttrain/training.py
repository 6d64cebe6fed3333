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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from posttrain.checkpoints import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    latest_checkpoint,
    load_model_weights,
    load_pretrained,
    load_trainer_state,
    save_checkpoint,
    save_final_model,
)
from posttrain.config import SFTConfig, config_to_dict
from posttrain.data.batching import (
    EpochPlan,
    collate,
    epoch_padding_fractions,
    plan_batches,
    rank_micro_batches,
)
from posttrain.data.tokenized import DataReport, TokenizedExample, load_dataset_for_training
from posttrain.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    check_same_config,
    full_model_state_dict,
    full_optimizer_state_dict,
    init_distributed,
    is_fsdp,
    load_optimizer_state,
    shutdown,
    wrap_model,
)
from posttrain.evaluation import autocast, evaluate_loss, to_device
from posttrain.loss import ResponseLoss, StepStats, loss_weights, step_denominator
from posttrain.metrics import METRICS_FILE, MetricsLogger, ProgressReporter, plot_metrics
from posttrain.optim import build_optimizer, lr_lambda
from posttrain.primitives import pad_token_id_of
from posttrain.rng_state import restore_rng_state
from posttrain.run_dir import check_output_dir, prepare_output_dir

logger = logging.getLogger("posttrain")

PLOT_FILE = "metrics.png"
# Files and folders a run writes into output_dir; anything else there is left alone.
RUN_ARTIFACTS = (CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, PLOT_FILE, "tensorboard")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says what to do."""

    user_facing = True


@dataclass
class TrainResult:
    """What a finished run produced."""

    final_loss: float
    final_model_dir: Path
    metrics_path: Path
    plot_path: Path | None
    train_seconds: float
    steps: int


@dataclass
class Run:
    """Everything a run holds between steps."""

    info: DistInfo
    out: Path
    model: PreTrainedModel
    tokenizer: Any
    pad_id: int
    loss_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_examples: list[TokenizedExample]
    eval_examples: list[TokenizedExample]
    plan: EpochPlan
    total_steps: int
    autocast_dtype: torch.dtype | None
    start_step: int = 0
    resumed: bool = False
    plans: dict[int, EpochPlan] = field(default_factory=dict)


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
    metrics = MetricsLogger(
        run.out,
        config_to_dict(config),
        enabled=info.is_main,
        resume_step=run.start_step if run.resumed else None,
    )
    progress = ProgressReporter(run.total_steps, enabled=info.is_main and config.progress)
    final_loss = float("nan")
    started = time.monotonic()
    try:
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
                )
                metrics.log(done, row)
                progress.update(done, row)
            if due(done, config.save_every, run.total_steps, at_end=False):
                save_step(run, done, config)
    finally:
        progress.close()
        metrics.close()
    return finish(run, config, final_loss, time.monotonic() - started)


def due(done: int, every: int | None, total: int, at_end: bool = True) -> bool:
    """Whether a component that runs every `every` steps (0/None: never) runs after step
    `done`; with `at_end` it also runs after the last step, without it never then."""
    if not every:
        return False
    if done == total:
        return at_end
    return done % every == 0


# --------------------------------------------------------------------------- the phases


def prepare_run(config: SFTConfig, info: DistInfo) -> Run:
    """Load everything and surface every input error before the first step; resume."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    check_same_config(config_to_dict(config), info)
    out = _output_dir(config, info)
    torch.manual_seed(config.seed)
    # fp32 master weights whatever the checkpoint's dtype; autocast does the bf16 compute.
    model, tokenizer = load_pretrained(config.model, dtype=torch.float32)
    fmt = config.data_format()
    train_examples, report = load_dataset_for_training(config.train_file, tokenizer, fmt)
    eval_examples = (
        load_dataset_for_training(config.eval_file, tokenizer, fmt)[0] if config.eval_file else []
    )
    if len(train_examples) < info.world_size:
        raise ValueError(
            f"the training set has {len(train_examples)} example(s) after filtering, fewer "
            f"than the {info.world_size} ranks: every rank needs at least one example per "
            "step. Use more data or fewer processes (--nproc_per_node)"
        )
    plan = _epoch_plan(train_examples, config, info, epoch=0)
    total_steps = config.max_steps or math.ceil(config.epochs * len(plan))
    if info.is_main:
        log_data_plan(report, train_examples, plan, total_steps, config, info.world_size)
    model.to(info.device)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.config.use_cache = False
    autocast_dtype = autocast_dtype_for(config.precision, info.device)
    # Rank 0 picks the checkpoint, so every rank resumes from the same one.
    checkpoint = broadcast_object(latest_checkpoint(out) if config.resume else None, info)
    if config.resume and checkpoint is None and info.is_main:
        logger.info("--resume: no complete checkpoint in %s, starting from step 0", out)
    if checkpoint is not None:
        # The weights go into the whole model, before any sharding.
        load_model_weights(model, checkpoint)
    # FSDP replaces the parameters by shards: the optimizer is built after wrapping.
    loss = ResponseLoss(
        model,
        chunk_size=config.loss_chunk_size,
        matmul_dtype=torch.bfloat16 if config.head_matmul_dtype == "bf16" else None,
    )
    param_dtype = autocast_dtype if config.strategy == "fsdp" else None
    loss_module = wrap_model(loss, info, config.strategy, param_dtype=param_dtype)
    loss_module.train()
    optimizer = build_optimizer(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
    )
    schedule = lr_lambda(config.lr_scheduler, config.warmup_steps, config.min_lr_ratio, total_steps)
    run = Run(
        info=info,
        out=out,
        model=model,
        tokenizer=tokenizer,
        pad_id=pad_token_id_of(tokenizer),
        loss_module=loss_module,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        train_examples=train_examples,
        eval_examples=eval_examples,
        plan=plan,
        total_steps=total_steps,
        autocast_dtype=autocast_dtype,
    )
    if checkpoint is not None:
        restore(run, checkpoint)
    return run


def _output_dir(config: SFTConfig, info: DistInfo) -> Path:
    out = Path(config.output_dir)
    # Every rank looks (and fails alike) before rank 0 deletes or creates anything.
    check_output_dir(out, RUN_ARTIFACTS, overwrite=config.overwrite, resume=config.resume)
    barrier(info)
    if info.is_main:
        prepare_output_dir(out, RUN_ARTIFACTS, overwrite=config.overwrite, resume=config.resume)
    barrier(info)
    return out


def log_data_plan(
    report: DataReport,
    examples: Sequence[TokenizedExample],
    plan: EpochPlan,
    total_steps: int,
    config: SFTConfig,
    world_size: int,
) -> None:
    """Log what the data became and how it is batched, once at start."""
    in_order, grouped = epoch_padding_fractions(
        [len(e.input_ids) for e in examples],
        config.micro_batch_size,
        config.grad_accum_steps,
        world_size,
        config.seed,
    )
    logger.info("%s", report.summary())
    logger.info(
        "%d examples, global batch %d (%d x %d x %d ranks), %d steps; padding %.1f%% of "
        "tokens%s (%.1f%% in file order)",
        len(examples),
        config.micro_batch_size * config.grad_accum_steps * world_size,
        config.micro_batch_size,
        config.grad_accum_steps,
        world_size,
        total_steps,
        100 * (grouped if config.group_by_length else in_order),
        " with length grouping" if config.group_by_length else "",
        100 * in_order,
    )
    if plan.left_out:
        logger.info(
            "the last step of each epoch leaves out %d example(s): its size is not a "
            "multiple of the %d ranks",
            plan.left_out,
            world_size,
        )


def restore(run: Run, checkpoint: Path) -> None:
    """Optimizer, schedule, RNG and step from a checkpoint (the weights are already in)."""
    state = load_trainer_state(checkpoint)
    load_optimizer_state(run.model, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    run.start_step = int(state["step"])
    run.resumed = True
    if run.info.is_main:
        logger.info("resumed from %s at step %d", checkpoint, run.start_step)


def _epoch_plan(
    examples: Sequence[TokenizedExample], config: SFTConfig, info: DistInfo, epoch: int
) -> EpochPlan:
    return plan_batches(
        [len(e.input_ids) for e in examples],
        config.micro_batch_size,
        config.grad_accum_steps,
        info.world_size,
        config.seed,
        epoch,
        config.group_by_length,
    )


def step_batches(run: Run, step: int, config: SFTConfig) -> list[dict[str, Tensor]]:
    """This rank's micro-batches of optimizer step `step` (0-based), on the device."""
    epoch, index = divmod(step, len(run.plan))
    if epoch not in run.plans:
        run.plans.clear()
        run.plans[epoch] = _epoch_plan(run.train_examples, config, run.info, epoch)
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


def save_step(run: Run, done: int, config: SFTConfig) -> None:
    """A checkpoint after step `done`: every rank gathers the state, rank 0 writes it."""
    sharded = is_fsdp(run.loss_module)
    weights = full_model_state_dict(run.model, sharded)
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
            extra={"epoch": (done - 1) // len(run.plan)},
            model_state_dict=weights,
            optimizer_state=optimizer_state,
        )
    barrier(run.info)


def finish(run: Run, config: SFTConfig, final_loss: float, train_seconds: float) -> TrainResult:
    """Save the final model and plot the metrics (rank 0); every rank gathers the weights."""
    final_dir = run.out / FINAL_DIR
    plot_path = None
    weights = full_model_state_dict(run.model, is_fsdp(run.loss_module))
    if run.info.is_main:
        final_dir = save_final_model(
            run.out, run.model, run.tokenizer, config, model_state_dict=weights
        )
        metrics_path = run.out / METRICS_FILE
        if metrics_path.exists():
            plot_path = plot_metrics(metrics_path, run.out / PLOT_FILE)
    barrier(run.info)
    return TrainResult(
        final_loss, final_dir, run.out / METRICS_FILE, plot_path, train_seconds, run.total_steps
    )


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked for (or, with `auto`, where the GPU supports it)."""
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device.type == "cuda" and not supported:
            raise ValueError("precision='bf16' but this GPU does not support bfloat16")
        return torch.bfloat16
    return torch.bfloat16 if supported else None
