"""The SFT training loop: `train(config)`, the function behind `posttrain sft`.

One function, top to bottom: set up, load, plan the data, then per optimizer step
accumulate the gradients of its micro-batches, clip, step, log, evaluate and
checkpoint. The loss of each micro-batch is computed by `ResponseLoss`, which runs the
model body and then the fused chunked loss over response positions only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    restore_rng_state,
    save_checkpoint,
    save_final_model,
)
from posttrain.chunked import FusedNLL, body_hidden_states, find_linear_head, fused_linear_nll
from posttrain.config import SFTConfig, config_to_dict
from posttrain.data import (
    TokenizedExample,
    collate,
    epoch_padding_fractions,
    load_dataset_for_training,
    plan_batches,
    rank_micro_batches,
)
from posttrain.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    check_same_config,
    full_model_state_dict,
    full_optimizer_state_dict,
    init_distributed,
    is_fsdp,
    load_optimizer_state,
    local_module,
    shutdown,
    wrap_model,
)
from posttrain.metrics import METRICS_FILE, MetricsLogger, ProgressReporter, plot_metrics
from posttrain.primitives import compute_entropy, log_probs_from_logits, pad_token_id_of

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


# --------------------------------------------------------------------------- the loss


class ResponseLoss(nn.Module):
    """The model plus its response-token loss, as one module.

    Wrapping both in one `forward` lets DDP and FSDP see a single forward per
    micro-batch (their hooks fire on it), while the loss never builds the full
    (batch, seq, vocab) logits: only response positions go through the head.
    """

    def __init__(self, model: PreTrainedModel, config: SFTConfig) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = config.logprob_chunk_size
        self.matmul_dtype = torch.bfloat16 if config.head_matmul_dtype == "bf16" else None

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, weights: Tensor
    ) -> FusedNLL:
        """Loss sum_i w_i * -log p(label_i) over positions with a non-zero weight.

        input_ids, attention_mask, labels: (batch, seq) int64; weights: (batch, seq)
        float32, zero off the response.
        """
        positions = weights != 0
        head = find_linear_head(self.model)
        if head is None:
            return self._full_logits_loss(input_ids, attention_mask, labels, weights, positions)
        hidden = body_hidden_states(self.model, input_ids, attention_mask)
        # The head's precision is set by head_matmul_dtype, not by an outer autocast.
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_nll(
                hidden[positions],
                head.weight,
                head.bias,
                labels[positions],
                weights[positions],
                chunk_size=self.chunk_size,
                matmul_dtype=self.matmul_dtype,
                logit_scale=head.logit_scale,
                softcap=head.softcap,
            )

    def _full_logits_loss(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        weights: Tensor,
        positions: Tensor,
    ) -> FusedNLL:
        # For heads the chunked path cannot reproduce exactly: the model's own logits.
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        selected = logits.logits[positions]
        targets = labels[positions]
        log_probs = log_probs_from_logits(selected, targets)
        with torch.no_grad():
            entropy_sum = compute_entropy(selected).sum()
            correct = (selected.argmax(-1) == targets).sum()
        return FusedNLL(
            loss=-(log_probs * weights[positions]).sum(),
            nll_sum=-log_probs.detach().sum(),
            entropy_sum=entropy_sum,
            num_correct=correct,
            num_tokens=int(targets.numel()),
        )


def loss_weights(response_mask: Tensor, normalization: str, denominator: float) -> Tensor:
    """Per-token loss weights of a micro-batch, (batch, seq) float32.

    token: every response token weighs 1 / (response tokens in the global step), so the
    step's loss is the mean over its tokens however it is split into micro-batches.
    sequence: a sequence's tokens weigh 1 / (its response tokens * sequences with a
    response in the global step): each sequence's mean, averaged over sequences.
    """
    mask = response_mask.float()
    if normalization == "token":
        return mask / denominator
    per_row = mask.sum(-1, keepdim=True).clamp(min=1)
    return mask / per_row / denominator


def step_denominator(
    batches: Sequence[dict[str, Tensor]], normalization: str, info: DistInfo, device: torch.device
) -> float:
    """The global count that normalises a step's loss: response tokens or sequences."""
    if normalization == "token":
        local = sum(float(b["response_mask"].sum()) for b in batches)
    else:
        local = sum(float((b["response_mask"].sum(-1) > 0).sum()) for b in batches)
    total = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device), info)
    return max(float(total), 1.0)


@dataclass
class StepStats:
    """Sums over a step's (or an evaluation's) micro-batches, on this rank."""

    loss: float = 0.0
    nll_sum: float = 0.0
    entropy_sum: float = 0.0
    num_correct: float = 0.0
    num_tokens: float = 0.0
    num_input_tokens: float = 0.0

    def add(self, out: FusedNLL, batch: dict[str, Tensor]) -> None:
        self.loss += float(out.loss.detach())
        self.nll_sum += float(out.nll_sum)
        self.entropy_sum += float(out.entropy_sum)
        self.num_correct += float(out.num_correct)
        self.num_tokens += float(out.num_tokens)
        self.num_input_tokens += float(batch["attention_mask"].sum())

    def all_reduced(self, info: DistInfo, device: torch.device) -> StepStats:
        values = torch.tensor(
            [
                self.loss,
                self.nll_sum,
                self.entropy_sum,
                self.num_correct,
                self.num_tokens,
                self.num_input_tokens,
            ],
            dtype=torch.float64,
            device=device,
        )
        return StepStats(*all_reduce_sum(values, info).tolist())


def accumulate_gradients(
    loss_module: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    config: SFTConfig,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
) -> StepStats:
    """Forward and backward every micro-batch of one optimizer step on this rank.

    Gradients add up in the parameters' `.grad`; with `token` normalisation they equal
    the gradient of the mean response-token loss over the whole global step, on one
    process or on many.
    """
    device = info.device
    denominator = step_denominator(batches, config.loss_normalization, info, device)
    stats = StepStats()
    for i, batch in enumerate(batches):
        weights = loss_weights(batch["response_mask"], config.loss_normalization, denominator)
        # DDP all-reduces gradients on the last micro-batch only.
        sync = i == len(batches) - 1 or not hasattr(loss_module, "no_sync")
        context = loss_module.no_sync() if not sync else contextlib.nullcontext()
        with (
            context,
            torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ),
        ):
            out = loss_module(
                batch["input_ids"], batch["attention_mask"], batch["labels"], weights.to(device)
            )
        # The weights already divide by the global count, so the step's gradient is the
        # sum over ranks; DDP and FSDP average over ranks, which this factor undoes.
        (out.loss * info.world_size if info.is_distributed else out.loss).backward()
        stats.add(out, batch)
    return stats


@torch.no_grad()
def evaluate(
    loss_module: nn.Module,
    examples: Sequence[TokenizedExample],
    config: SFTConfig,
    pad_id: int,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Response NLL per token, perplexity, entropy and token accuracy on held-out data.

    Every rank must call this: each scores its share and the sums are all-reduced.
    """
    # DDP's forward may broadcast buffers, a collective: its inner module needs none.
    module = local_module(loss_module)
    module.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    mine = order[info.rank :: info.world_size]
    stats = StepStats()
    micro = config.micro_batch_size
    # Under FSDP every forward all-gathers parameters, so every rank runs the same number
    # of forwards; one that has run out of examples repeats one and does not count it.
    rounds = math.ceil(math.ceil(len(examples) / info.world_size) / micro)
    for start in range(0, rounds * micro, micro):
        ids = mine[start : start + micro]
        counted = bool(ids)
        batch = _to_device(collate([examples[i] for i in ids or order[:1]], pad_id), info.device)
        with torch.autocast(
            info.device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            out = module(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                batch["response_mask"].float(),
            )
        if counted:
            stats.add(out, batch)
    module.train()
    total = stats.all_reduced(info, info.device)
    tokens = max(total.num_tokens, 1.0)
    nll = total.nll_sum / tokens
    return {
        "eval_loss": nll,
        "eval_perplexity": math.exp(min(nll, 700.0)),
        "eval_entropy": total.entropy_sum / tokens,
        "eval_token_accuracy": total.num_correct / tokens,
    }


# --------------------------------------------------------------------------- set-up helpers


def lr_lambda(config: SFTConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warmup, then the chosen decay."""
    warmup = config.warmup_steps
    floor = config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.lr_scheduler == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, config: SFTConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = {
        "lr": config.lr,
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_eps,
    }
    # The fused kernel updates all parameters in one pass (CPU and CUDA); DTensor
    # parameters (FSDP) and other devices use the default implementation.
    plain = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, fused=plain or None, **kwargs)


def autocast_dtype_for(config: SFTConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked for (or, with `auto`, where the GPU supports it)."""
    if config.precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.precision == "bf16":
        if device.type == "cuda" and not supported:
            raise ValueError("precision='bf16' but this GPU does not support bfloat16")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def prepare_output_dir(config: SFTConfig, info: DistInfo) -> Path:
    """Refuse to mix two runs in one directory unless told to resume or overwrite."""
    out = Path(config.output_dir)
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if existing and not (config.resume or config.overwrite):
        raise ValueError(
            f"output_dir {out} already holds a run ({', '.join(existing)}): pass --resume to "
            "continue it or --overwrite to start again"
        )
    # Every rank looks before rank 0 deletes or creates anything.
    barrier(info)
    if info.is_main:
        if config.overwrite:
            for name in existing:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    return out


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _steps_per_epoch(num_examples: int, global_batch: int, world_size: int = 1) -> int:
    """Steps per epoch as `plan_batches` makes them.

    Full global batches, plus a smaller last step from the remainder, trimmed to a
    multiple of the world size (every rank needs an example per micro-batch).
    """
    full, tail = divmod(num_examples, global_batch)
    return max(1, full + (1 if tail >= world_size else 0))


def _step_batches(
    plan_cache: dict[int, list],
    examples: Sequence[TokenizedExample],
    step: int,
    steps_per_epoch: int,
    config: SFTConfig,
    info: DistInfo,
    pad_id: int,
) -> list[dict[str, Tensor]]:
    """This rank's micro-batches of optimizer step `step` (0-based), on the device."""
    epoch, index = divmod(step, steps_per_epoch)
    if epoch not in plan_cache:
        plan_cache.clear()
        plan_cache[epoch] = plan_batches(
            [len(e.input_ids) for e in examples],
            config.micro_batch_size,
            config.grad_accum_steps,
            info.world_size,
            config.seed,
            epoch,
            config.group_by_length,
        )
    step_examples = plan_cache[epoch][index]
    micro = rank_micro_batches(step_examples, config.micro_batch_size, info.world_size, info.rank)
    return [_to_device(collate([examples[i] for i in ids], pad_id), info.device) for ids in micro]


# --------------------------------------------------------------------------- the loop


def train(config: SFTConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.train_file`; return where the results are."""
    info = init_distributed()
    try:
        return _train(config, info)
    finally:
        shutdown(info)


def _train(config: SFTConfig, info: DistInfo) -> TrainResult:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    check_same_config(config_to_dict(config), info)
    out = prepare_output_dir(config, info)
    torch.manual_seed(config.seed)

    # ---- model, tokenizer, data: every input error surfaces here, before training
    # fp32 master weights whatever the checkpoint's dtype; autocast does the bf16 compute.
    model, tokenizer = load_pretrained(config.model, dtype=torch.float32)
    pad_id = pad_token_id_of(tokenizer)
    train_examples, report = load_dataset_for_training(config.train_file, tokenizer, config)
    eval_examples = (
        load_dataset_for_training(config.eval_file, tokenizer, config)[0]
        if config.eval_file
        else []
    )
    global_batch = config.micro_batch_size * config.grad_accum_steps * info.world_size
    if len(train_examples) < info.world_size:
        raise ValueError(
            f"the training set has {len(train_examples)} example(s) after filtering, fewer "
            f"than the {info.world_size} ranks: every rank needs at least one example per "
            "step. Use more data or fewer processes (--nproc_per_node)"
        )
    steps_per_epoch = _steps_per_epoch(len(train_examples), global_batch, info.world_size)
    left_out = len(train_examples) % global_batch % info.world_size
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    if info.is_main:
        in_order, grouped = epoch_padding_fractions(
            [len(e.input_ids) for e in train_examples],
            config.micro_batch_size,
            config.grad_accum_steps,
            info.world_size,
            config.seed,
        )
        logger.info("%s", report.summary())
        logger.info(
            "%d examples, global batch %d (%d x %d x %d ranks), %d steps; padding %.1f%% of "
            "tokens%s (%.1f%% in file order)",
            len(train_examples),
            global_batch,
            config.micro_batch_size,
            config.grad_accum_steps,
            info.world_size,
            total_steps,
            100 * (grouped if config.group_by_length else in_order),
            " with length grouping" if config.group_by_length else "",
            100 * in_order,
        )
        if left_out:
            logger.info(
                "the last step of each epoch leaves out %d example(s): its size is not a "
                "multiple of the %d ranks",
                left_out,
                info.world_size,
            )

    model.to(info.device)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.config.use_cache = False
    autocast_dtype = autocast_dtype_for(config, info.device)

    # ---- resume: the weights go into the whole model, before any sharding
    start_step = 0
    # Rank 0 picks the checkpoint, so every rank resumes from the same one.
    checkpoint = broadcast_object(latest_checkpoint(out) if config.resume else None, info)
    if config.resume and checkpoint is None and info.is_main:
        logger.info("--resume: no complete checkpoint in %s, starting from step 0", out)
    state = None
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        load_model_weights(model, checkpoint)

    # FSDP replaces the parameters by shards: the optimizer is built after wrapping.
    loss_module = wrap_model(
        ResponseLoss(model, config),
        info,
        config.strategy,
        param_dtype=autocast_dtype if config.strategy == "fsdp" else None,
    )
    sharded = is_fsdp(loss_module)
    loss_module.train()
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    if checkpoint is not None and state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_step = int(state["step"])
        if info.is_main:
            logger.info("resumed from %s at step %d", checkpoint, start_step)
    metrics = MetricsLogger(
        out, config, enabled=info.is_main, resume_step=start_step if checkpoint else None
    )
    progress = ProgressReporter(total_steps, enabled=info.is_main and config.progress)
    plan_cache: dict[int, list] = {}
    final_loss = float("nan")
    started = time.monotonic()
    try:
        for step in range(start_step, total_steps):
            step_start = time.monotonic()
            batches = _step_batches(
                plan_cache, train_examples, step, steps_per_epoch, config, info, pad_id
            )
            stats = accumulate_gradients(loss_module, batches, config, info, autocast_dtype)
            total = stats.all_reduced(info, info.device)
            if not math.isfinite(total.loss):
                last = latest_checkpoint(out)
                raise TrainingError(
                    f"the loss became {total.loss} at step {step + 1}; stopping without "
                    "applying that update. Last good checkpoint: "
                    f"{last if last else 'none'}. Try a lower --lr or gradient clipping."
                )
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            # Under FSDP the norm is a DTensor; full_tensor() makes it a plain number.
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            final_loss = total.loss
            done = step + 1

            if done % config.log_every == 0 or done == total_steps:
                tokens = max(total.num_tokens, 1.0)
                row = {
                    "loss": total.loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "entropy": total.entropy_sum / tokens,
                    "token_accuracy": total.num_correct / tokens,
                    "tokens_per_s": total.num_input_tokens / (time.monotonic() - step_start),
                    "epoch": step / steps_per_epoch,
                }
                metrics.log(done, row)
                progress.update(done, row)
            else:
                progress.update(done)
            if (
                eval_examples
                and config.eval_every
                and (done % config.eval_every == 0 or done == total_steps)
            ):
                row = evaluate(loss_module, eval_examples, config, pad_id, info, autocast_dtype)
                metrics.log(done, row)
                progress.update(done, row)
            periodic = config.save_every and done % config.save_every == 0
            if periodic and done < total_steps:
                # Every rank takes part in gathering the state; rank 0 writes it.
                weights = full_model_state_dict(model, sharded)
                optimizer_state = full_optimizer_state_dict(model, optimizer)
                if info.is_main:
                    save_checkpoint(
                        out,
                        done,
                        model,
                        tokenizer,
                        optimizer,
                        scheduler,
                        config,
                        extra={"epoch": step // steps_per_epoch},
                        model_state_dict=weights,
                        optimizer_state=optimizer_state,
                    )
                barrier(info)
    finally:
        progress.close()
        metrics.close()
    train_seconds = time.monotonic() - started

    final_dir = out / FINAL_DIR
    plot_path = None
    weights = full_model_state_dict(model, sharded)
    if info.is_main:
        final_dir = save_final_model(out, model, tokenizer, config, model_state_dict=weights)
        if metrics.path.exists():
            plot_path = plot_metrics(metrics.path, out / PLOT_FILE)
    barrier(info)
    return TrainResult(
        final_loss, final_dir, out / METRICS_FILE, plot_path, train_seconds, total_steps
    )
