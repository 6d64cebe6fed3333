"""Preparing a run for any method: `prepare_run` builds the `Run` the loop works on.

In order: the run directory, the tokenizer, the method's data (every input error
surfaces before the model loads), the resume decision (a finished run answers at once),
the model (fp32 master weights, LoRA, gradient checkpointing, a checkpoint's weights),
the policy module wrapped for DDP/FSDP, the optimizer and schedule, a reference model
when the method needs one, and finally the checkpoint's optimizer, schedule, random
state and the method's own state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from posttrain.common.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    check_same_config,
    is_fsdp,
    load_optimizer_state,
    wrap_model,
)
from posttrain.engine.checkpoints import CHECKPOINTS_DIR, FINAL_DIR, load_trainer_state
from posttrain.engine.method import Method
from posttrain.engine.metrics import METRICS_FILE, read_metrics, require_tracker
from posttrain.engine.optim import build_optimizer, lr_lambda
from posttrain.engine.resume import ResumePoint, check_resume_settings, find_resume_point
from posttrain.engine.rng_state import rank_rng_state, restore_rng_state
from posttrain.engine.run import Run
from posttrain.engine.run_dir import check_output_dir, prepare_output_dir
from posttrain.engine.settings import ENGINE_BREAKS_EXACT_RESUME, RunSettings
from posttrain.models.loading import (
    check_model_weights,
    load_model,
    load_model_weights,
    load_tokenizer_of,
    model_chain,
)
from posttrain.models.lora import LoraSettings, apply_lora, load_adapter_weights, require_peft
from posttrain.models.policy import PolicyModule
from posttrain.primitives import pad_token_id_of

logger = logging.getLogger("posttrain")

PLOT_FILE = "metrics.png"
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


def prepare_run(method: Method, settings: RunSettings, info: DistInfo) -> Run | TrainResult:
    """Load everything and surface every input error before the first step; resume.

    Returns the `TrainResult` of the finished run instead when a finished run is resumed.
    """
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if info.is_main:
        logger.info(
            "torch uses %d CPU thread(s)%s",
            torch.get_num_threads(),
            "" if settings.num_threads else " (--num-threads N to change)",
        )
    check_same_config(method.config_dict(), info)
    if info.is_main:
        require_tracker(settings.report_to)  # a missing package is said before any loading
    if settings.lora:
        require_peft()  # before anything slow: a missing package is one line, at once
    out = _output_dir(settings, info)
    # Without resume the weights are surely needed: a directory without them is said at
    # once; a resumed run may be finished, which it says without reading them.
    chain = model_chain(settings.model, require_weights=not settings.resume)
    # The weights load only once the run is known to have work to do: resuming a
    # finished run answers at once.
    tokenizer = load_tokenizer_of(chain)
    total_steps = method.prepare(tokenizer, info)
    # Rank 0 decides, so every rank resumes from the same checkpoint (or stops alike).
    point = broadcast_object(_resume_point(out, method, settings, total_steps, info), info)
    if isinstance(point, str):
        raise ValueError(point)
    if point.finished:
        return _finished_result(out, total_steps)
    check_model_weights(chain)
    model = _load_model(chain, settings, info)
    if point.checkpoint is not None:
        # Into the whole model, before any sharding; a LoRA checkpoint holds the adapter
        # only (the base weights are the ones just loaded).
        load = load_adapter_weights if settings.lora else load_model_weights
        load(model, point.checkpoint)
    autocast_dtype = autocast_dtype_for(settings.precision, info.device)
    policy, module, optimizer, scheduler = _optimization(
        model, settings, info, autocast_dtype, total_steps * method.updates_per_step
    )
    run = Run(
        info=info,
        out=out,
        settings=settings,
        model=model,
        tokenizer=tokenizer,
        pad_id=pad_token_id_of(tokenizer),
        policy=policy,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
        autocast_dtype=autocast_dtype,
    )
    if method.needs_reference and not settings.lora:
        run.reference = _reference(chain, settings, info, autocast_dtype)
    for wrapped in (run.module, run.reference):
        if wrapped is not None and is_fsdp(wrapped):
            _initialise_fsdp(wrapped, info.device)
    if info.is_main:
        method.log_plan(run)
    if point.checkpoint is not None:
        restore(run, method, point.checkpoint)
    return run


def _load_model(chain: list[Path], settings: RunSettings, info: DistInfo) -> PreTrainedModel:
    """fp32 master weights whatever the checkpoint's dtype (autocast does the bf16
    compute), with LoRA adapters attached when asked, on the device, before DDP/FSDP
    wrap the model."""
    torch.manual_seed(settings.seed)
    model = load_model(chain, dtype=torch.float32)
    if settings.lora:
        lora = LoraSettings(
            settings.lora_r,
            settings.lora_alpha,
            settings.lora_dropout,
            settings.lora_target_modules,
        )
        model = apply_lora(model, lora, str(Path(settings.model).resolve()), log=info.is_main)
    model.to(info.device)
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.config.use_cache = False
    return model


def _policy(model: PreTrainedModel, settings: RunSettings) -> PolicyModule:
    return PolicyModule(
        model,
        chunk_size=settings.loss_chunk_size,
        matmul_dtype=torch.bfloat16 if settings.head_matmul_dtype == "bf16" else None,
    )


def _optimization(
    model: PreTrainedModel,
    settings: RunSettings,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
    total_updates: int,
) -> tuple[PolicyModule, torch.nn.Module, torch.optim.Optimizer, Any]:
    """The policy module, as wrapped, and the optimizer and a schedule of
    `total_updates` optimizer steps."""
    policy = _policy(model, settings)
    param_dtype = autocast_dtype if settings.strategy == "fsdp" else None
    # FSDP replaces the parameters by shards: the optimizer is built after wrapping.
    module = wrap_model(policy, info, settings.strategy, param_dtype=param_dtype)
    module.train()
    optimizer = build_optimizer(
        model,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=(settings.adam_beta1, settings.adam_beta2),
        eps=settings.adam_eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, total_updates))
    return policy, module, optimizer, scheduler


def _schedule(settings: RunSettings, total_steps: int) -> Any:
    return lr_lambda(
        settings.lr_scheduler, settings.warmup_steps, settings.min_lr_ratio, total_steps
    )


def _initialise_fsdp(module: torch.nn.Module, device: torch.device) -> None:
    """One tiny forward through an FSDP root. FSDP sets its tree up at the root's first
    forward; generation (RL rollouts, evaluation) calls the layers below the root, which
    would set themselves up as roots of their own first and make the real root fail."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    training = module.training
    module.eval()  # no dropout: nothing random is drawn
    with torch.no_grad():
        module(ids, torch.ones_like(ids), ids, output="log_probs")
    module.train(training)


def _reference(
    chain: list[Path], settings: RunSettings, info: DistInfo, autocast_dtype: torch.dtype | None
) -> torch.nn.Module:
    """A frozen copy of the starting model, sharded like the policy under FSDP (DDP
    has nothing to synchronise for it: every rank holds it whole)."""
    model = load_model(chain, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    model.to(info.device)
    model.config.use_cache = False
    reference = _policy(model, settings)
    if info.is_distributed and settings.strategy == "fsdp":
        reference = wrap_model(reference, info, "fsdp", param_dtype=autocast_dtype)
    return reference


def _resume_point(
    out: Path, method: Method, settings: RunSettings, total_steps: int, info: DistInfo
) -> ResumePoint | str:
    """Rank 0's resume decision, or its error message (broadcast so all ranks raise)."""
    if not info.is_main:
        return ResumePoint(None)
    try:
        point = find_resume_point(
            out, resume=settings.resume, resume_from=settings.resume_from, total_steps=total_steps
        )
        if point.checkpoint is not None:
            check_resume_settings(
                point.checkpoint,
                method.config_dict(),
                (*ENGINE_BREAKS_EXACT_RESUME, *method.breaks_exact_resume),
                lambda saved, extra: method.resume_problems(saved, extra, info.world_size),
                method.fingerprint(),
                settings.resume_with_changes,
            )
    except ValueError as exc:
        return str(exc)
    return point


def _finished_result(out: Path, total_steps: int) -> TrainResult:
    metrics_path = out / METRICS_FILE
    losses = [r["loss"] for r in read_metrics(metrics_path) if "loss" in r]
    plot = out / PLOT_FILE
    return TrainResult(
        final_loss=losses[-1] if losses else float("nan"),
        final_model_dir=out / FINAL_DIR,
        metrics_path=metrics_path,
        plot_path=plot if plot.exists() else None,
        train_seconds=0.0,
        steps=total_steps,
        already_finished=True,
    )


def _output_dir(settings: RunSettings, info: DistInfo) -> Path:
    out = Path(settings.output_dir)
    # Every rank looks (and fails alike) before rank 0 deletes or creates anything.
    check_output_dir(out, RUN_ARTIFACTS, overwrite=settings.overwrite, resume=settings.resume)
    barrier(info)
    if info.is_main:
        prepare_output_dir(out, RUN_ARTIFACTS, overwrite=settings.overwrite, resume=settings.resume)
    barrier(info)
    return out


def restore(run: Run, method: Method, checkpoint: Path) -> None:
    """Optimizer, schedule, every rank's random state, the method's state and the step
    from a checkpoint (the weights are already in). Optimizer settings of this run
    (learning rate and schedule, betas, eps, weight decay) replace the checkpoint's from
    the resumed step."""
    state = load_trainer_state(checkpoint)
    load_optimizer_state(run.model, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    apply_optimizer_settings(run.optimizer, run.scheduler, run.settings)
    rng, own = rank_rng_state(state, run.info.rank, run.info.world_size)
    restore_rng_state(rng)
    method.load_state_dict(state.get("extra", {}))
    run.start_step = int(state["step"])
    run.resumed = True
    if run.info.is_main:
        logger.info("resumed from %s at step %d", checkpoint, run.start_step)
        if not own:
            logger.info(
                "the checkpoint was saved by another number of ranks: the data order and "
                "batches are exact, random draws inside the model (dropout) are not"
            )


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    settings: RunSettings,
) -> None:
    """Put this run's optimizer settings into a restored optimizer and schedule.

    `load_state_dict` brings back the checkpoint's hyperparameters with its moments; a
    resumed run with a changed setting (accepted, and recorded in its config) must train
    with the new one from the resumed step. The schedule's function is this run's
    already; its peak (base_lrs) and the current lr are reset from it here.
    """
    betas = (settings.adam_beta1, settings.adam_beta2)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for index, group in enumerate(optimizer.param_groups):
        group["betas"] = betas
        group["eps"] = settings.adam_eps
        # build_optimizer's second group (biases, norms) never decays.
        group["weight_decay"] = settings.weight_decay if index == 0 else 0.0
        group["initial_lr"] = settings.lr
        group["lr"] = settings.lr * factor
    scheduler.base_lrs = [settings.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


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
