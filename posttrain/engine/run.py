"""`Run`: what a training run holds between steps, and the calls a method's step makes.

A method's `step` gives its micro-batches and objective to `Run.accumulate` (forward and
backward on this rank, DDP's gradient sync on the last micro-batch only, statistics
kept on the device), then calls `Run.optimizer_step` (finite-loss check, clipping, the
update, the schedule). `Run.log_probs` and `Run.reference_log_probs` score sequences
through the wrapped module, lean, for methods that need the policy's or a frozen
reference's log-probs (RL, DPO).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from posttrain.common.devices import autocast
from posttrain.common.distributed import DistInfo
from posttrain.common.sums import Sums
from posttrain.engine.checkpoints import latest_checkpoint
from posttrain.engine.settings import RunSettings
from posttrain.models.policy import Objective, PolicyModule, batch_log_probs


def accumulate(
    module: nn.Module,
    micro_batches: Sequence[dict[str, Tensor]],
    objective: Objective,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
) -> Sums:
    """Forward and backward every micro-batch of one optimizer step on this rank.

    Gradients add up in the parameters' `.grad`. Returns the sums of the objective's
    statistics and of its "loss", on the device (`Sums.all_reduced` reads them).
    """
    sums = Sums()
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        # DDP all-reduces gradients on the last micro-batch only.
        sync = i == last or not hasattr(module, "no_sync")
        context = module.no_sync() if not sync else contextlib.nullcontext()
        with context, autocast(info.device, autocast_dtype):
            loss, statistics = objective(module, batch)
        # The objective's loss already divides by the global count, so the step's
        # gradient is the sum over ranks; DDP and FSDP average, which this undoes.
        (loss * info.world_size if info.is_distributed else loss).backward()
        sums.add({"loss": loss, **statistics})
    return sums


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says what to do."""

    user_facing = True


class StopBeforeStep(RuntimeError):
    """Raised by a method's step, on every rank alike, before it changed anything (say,
    a reward function failed on a rollout): the engine checkpoints the last finished step
    and stops the run with this message."""


@dataclass
class Run:
    """Everything a run holds between steps.

    `model` is the (peft) model itself, `policy` the model with its lean loss and
    log-probs, `module` the policy as wrapped for DDP or FSDP: a method calls `module`,
    so that the wrapper's hooks fire. `reference` is the frozen reference policy of a
    method that needs one (None with LoRA: the adapters are switched off instead).
    """

    info: DistInfo
    out: Path
    settings: RunSettings
    model: PreTrainedModel
    tokenizer: Any
    pad_id: int
    policy: PolicyModule
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    autocast_dtype: torch.dtype | None
    reference: nn.Module | None = None
    start_step: int = 0
    resumed: bool = False

    def accumulate(self, micro_batches: Sequence[dict[str, Tensor]], objective: Objective) -> Sums:
        """Forward and backward every micro-batch of one optimizer step on this rank
        (see `accumulate`)."""
        return accumulate(self.module, micro_batches, objective, self.info, self.autocast_dtype)

    def optimizer_step(self, loss: float, done: int) -> tuple[float, float]:
        """Check the step's loss, clip, step, advance the schedule, clear the gradients;
        returns (grad_norm, lr). `done`: the step's number, counted from 1."""
        if not math.isfinite(loss):
            last = latest_checkpoint(self.out)
            raise TrainingError(
                f"the loss became {loss} at step {done}; stopping without applying that "
                f"update. Last good checkpoint: {last if last else 'none'}. Try a lower --lr "
                "or gradient clipping."
            )
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # Under FSDP the norm is a DTensor; full_tensor() makes it a plain number.
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.policy.weights_changed()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    @torch.no_grad()
    def log_probs(self, batch: dict[str, Tensor], with_entropy: bool = False) -> dict[str, Tensor]:
        """The policy's per-token log-probs of `batch["labels"]`, (batch, seq) float32
        (and "token_entropy"), without gradients: e.g. the old policy's, for RL."""
        return self._score(self.module, batch, with_entropy)

    @torch.no_grad()
    def reference_log_probs(self, batch: dict[str, Tensor]) -> Tensor:
        """The frozen reference's per-token log-probs of `batch["labels"]`, (batch, seq)
        float32: the starting model's, or with LoRA the model with adapters disabled."""
        if self.reference is not None:
            return self._score(self.reference, batch, False)["log_probs"]
        disable = getattr(self.model, "disable_adapter", None)
        if disable is None:
            raise RuntimeError("this run holds no reference model (Method.needs_reference)")
        with disable():
            return self._score(self.module, batch, False)["log_probs"]

    def _score(
        self, module: nn.Module, batch: dict[str, Tensor], with_entropy: bool
    ) -> dict[str, Tensor]:
        with autocast(self.info.device, self.autocast_dtype):
            return batch_log_probs(module, batch, with_entropy)
