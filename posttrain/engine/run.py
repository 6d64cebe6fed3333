"""Preparing a training run: the `Run` that the loop in `training.py` works on.

`prepare_run` loads the model, tokenizer and data (every input error surfaces here,
before the first step), plans the epoch, decides where a resumed run starts, and builds
the loss module, optimizer and schedule; `restore` puts a checkpoint's state back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from posttrain.common.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    check_same_config,
    load_optimizer_state,
    wrap_model,
)
from posttrain.config import SFTConfig, config_to_dict
from posttrain.data.batching import (
    EpochPlan,
    epoch_padding_fractions,
    plan_batches,
)
from posttrain.data.records import load_records
from posttrain.data.report import boundary_warning
from posttrain.data.tokenized import (
    TokenizedExample,
    load_dataset_for_training,
    tokenize_for_training,
)
from posttrain.engine.checkpoints import CHECKPOINTS_DIR, FINAL_DIR, load_trainer_state
from posttrain.engine.metrics import (
    METRICS_FILE,
    read_metrics,
)
from posttrain.engine.optim import build_optimizer, lr_lambda
from posttrain.engine.resume import (
    ResumePoint,
    check_resume_settings,
    data_fingerprint,
    find_resume_point,
)
from posttrain.engine.rng_state import restore_rng_state
from posttrain.engine.run_dir import check_output_dir, prepare_output_dir
from posttrain.models.loading import (
    load_model,
    load_model_weights,
    load_tokenizer_of,
    model_chain,
)
from posttrain.models.lora import LoraSettings, apply_lora, load_adapter_weights, require_peft
from posttrain.models.policy import ResponseLoss
from posttrain.ops.workspace import Workspace
from posttrain.primitives import pad_token_id_of

logger = logging.getLogger("posttrain")

PLOT_FILE = "metrics.png"
# Pairs checked at start for prompt/response boundaries that tokenize differently apart
# than joined (`data_report.boundary_warning`).
BOUNDARY_CHECK_PAIRS = 2000
# Files and folders a run writes into output_dir; anything else there is left alone.
RUN_ARTIFACTS = (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    METRICS_FILE,
    PLOT_FILE,
    "tensorboard",
    "generations",
)


@dataclass
class TrainResult:
    """What a finished run produced."""

    final_loss: float
    final_model_dir: Path
    metrics_path: Path
    plot_path: Path | None
    train_seconds: float
    steps: int
    already_finished: bool = False


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
    # The loss's scratch buffers and narrowed head weight, kept between micro-batches.
    head_workspace: Workspace
    fingerprint: str = ""
    start_step: int = 0
    resumed: bool = False
    plans: dict[int, EpochPlan] = field(default_factory=dict)


def prepare_run(config: SFTConfig, info: DistInfo) -> Run | TrainResult:
    """Load everything and surface every input error before the first step; resume.

    Returns the `TrainResult` of the finished run instead when a finished run is resumed.
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    check_same_config(config_to_dict(config), info)
    if config.lora_r:
        require_peft()  # before anything slow: a missing package is one line, at once
    out = _output_dir(config, info)
    chain = model_chain(config.model)
    # The weights load only once the run is known to have work to do: resuming a
    # finished run answers at once.
    tokenizer = load_tokenizer_of(chain)
    train_examples, eval_examples = _load_data(config, tokenizer, info)
    plan = epoch_plan(train_examples, config, info, epoch=0)
    total_steps = config.max_steps or math.ceil(config.epochs * len(plan))
    fingerprint = data_fingerprint([e.input_ids for e in train_examples])
    # Rank 0 decides, so every rank resumes from the same checkpoint (or stops alike).
    point = broadcast_object(_resume_point(out, config, total_steps, fingerprint, info), info)
    if isinstance(point, str):
        raise ValueError(point)
    if point.finished:
        return _finished_result(out, total_steps, info)
    model = _load_model(chain, config, info)
    if info.is_main:
        log_data_plan(train_examples, plan, total_steps, config, info.world_size)
        _log_evaluation(config, len(eval_examples))
    model.to(info.device)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.config.use_cache = False
    if point.checkpoint is not None:
        # The weights go into the whole model, before any sharding; a LoRA checkpoint
        # holds the adapter only (the base weights are the ones just loaded).
        load = load_adapter_weights if config.lora_r else load_model_weights
        load(model, point.checkpoint)
    autocast_dtype = autocast_dtype_for(config.precision, info.device)
    run = Run(
        info=info,
        out=out,
        model=model,
        tokenizer=tokenizer,
        pad_id=pad_token_id_of(tokenizer),
        train_examples=train_examples,
        eval_examples=eval_examples,
        plan=plan,
        total_steps=total_steps,
        autocast_dtype=autocast_dtype,
        fingerprint=fingerprint,
        **_optimization(model, config, info, autocast_dtype, total_steps),
    )
    if point.checkpoint is not None:
        restore(run, point.checkpoint)
    return run


def _load_model(chain: list[Path], config: SFTConfig, info: DistInfo) -> PreTrainedModel:
    """fp32 master weights whatever the checkpoint's dtype (autocast does the bf16
    compute), with LoRA adapters attached when asked, before DDP/FSDP wrap the model."""
    torch.manual_seed(config.seed)
    model = load_model(chain, dtype=torch.float32)
    if config.lora_r:
        lora = LoraSettings(
            config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
        )
        model = apply_lora(model, lora, str(Path(config.model).resolve()), log=info.is_main)
    return model


def _load_data(
    config: SFTConfig, tokenizer: Any, info: DistInfo
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    fmt = config.data_format()
    records = load_records(config.train_file, fmt)
    train_examples, report = tokenize_for_training(records, tokenizer, fmt, config.train_file)
    if info.is_main:
        logger.info("%s", report.summary())
        # A sample bounds the start-up cost (it tokenizes each pair twice more, about 1 s
        # per 1,000 pairs); the warning is about a fraction, which a sample estimates.
        warning = boundary_warning(records[:BOUNDARY_CHECK_PAIRS], tokenizer)
        if warning:
            logger.warning("%s", warning)
    eval_examples: list[TokenizedExample] = []
    if config.eval_file:
        eval_examples = load_dataset_for_training(config.eval_file, tokenizer, fmt)[0]
        # The first N of the file: the same subset at every evaluation and in every run.
        eval_examples = eval_examples[: config.eval_limit]
    if len(train_examples) < info.world_size:
        raise ValueError(
            f"the training set has {len(train_examples)} example(s) after filtering, fewer "
            f"than the {info.world_size} ranks: every rank needs at least one example per "
            "step. Use more data or fewer processes (--nproc_per_node)"
        )
    return train_examples, eval_examples


def _resume_point(
    out: Path, config: SFTConfig, total_steps: int, fingerprint: str, info: DistInfo
) -> ResumePoint | str:
    """Rank 0's resume decision, or its error message (broadcast so all ranks raise)."""
    if not info.is_main:
        return ResumePoint(None)
    try:
        point = find_resume_point(
            out, resume=config.resume, resume_from=config.resume_from, total_steps=total_steps
        )
        if point.checkpoint is not None:
            check_resume_settings(point.checkpoint, config, fingerprint, info.world_size)
    except ValueError as exc:
        return str(exc)
    return point


def _finished_result(out: Path, total_steps: int, info: DistInfo) -> TrainResult:
    metrics_path = out / METRICS_FILE
    losses = [r["loss"] for r in read_metrics(metrics_path) if "loss" in r]
    plot = out / PLOT_FILE
    if info.is_main:
        logger.info("%s is a finished run of %d steps: nothing to do", out, total_steps)
    return TrainResult(
        final_loss=losses[-1] if losses else float("nan"),
        final_model_dir=out / FINAL_DIR,
        metrics_path=metrics_path,
        plot_path=plot if plot.exists() else None,
        train_seconds=0.0,
        steps=total_steps,
        already_finished=True,
    )


def _optimization(
    model: PreTrainedModel,
    config: SFTConfig,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
    total_steps: int,
) -> dict[str, Any]:
    """The wrapped loss module, the optimizer and the schedule of a run."""
    workspace = Workspace()
    loss = ResponseLoss(
        model,
        chunk_size=config.loss_chunk_size,
        matmul_dtype=torch.bfloat16 if config.head_matmul_dtype == "bf16" else None,
        workspace=workspace,
    )
    param_dtype = autocast_dtype if config.strategy == "fsdp" else None
    # FSDP replaces the parameters by shards: the optimizer is built after wrapping.
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {
        "loss_module": loss_module,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "head_workspace": workspace,
    }


def _log_evaluation(config: SFTConfig, num_examples: int) -> None:
    if not config.eval_file:
        return
    when = f"every {config.eval_every} steps and at the end" if config.eval_every else "at the end"
    logger.info(
        "evaluation: response-token loss on %d examples of %s, %s",
        num_examples,
        config.eval_file,
        when,
    )


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


def epoch_plan(
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
