"""The policy module: a causal LM with its lean training loss and log-probs, as one module.

`PolicyModule` is what the engine wraps with DDP or FSDP. Its one `forward` serves every
method, so the wrapper's hooks fire whatever a method asks of the model:

- `output="loss"`: the weighted token NLL through the fused chunked kernel (SFT's
  objective, and any method that trains on token log-likelihoods), a `FusedNLL`;
- `output="log_probs"`: per-token log-probs (and entropy), lean, for RL's old-policy
  and reference scoring and DPO's sequence log-probs.

Neither builds the (batch, seq, vocab) logits: only the positions asked for go through
the head, a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from posttrain.models.heads import body_hidden_states, find_linear_head
from posttrain.ops.fused_nll import FusedNLL, fused_linear_nll
from posttrain.ops.workspace import Workspace
from posttrain.primitives import full_logits_log_probs, lean_response_log_probs


class PolicyModule(nn.Module):
    """The model plus its lean loss and log-probs, as one module.

    chunk_size: rows of logits per chunk (None: from the memory budget); matmul_dtype:
    dtype of the loss's head matmuls (None: the weights' dtype, torch.bfloat16 to narrow
    them). `workspace` keeps the head's chunk buffers and narrowed weight between calls;
    whoever changes the weights calls `weights_changed()` (the engine does, after each
    optimizer step), and `release_buffers()` gives the memory back (before generation).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        chunk_size: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.matmul_dtype = matmul_dtype
        self.workspace = Workspace() if workspace is None else workspace
        # Found once; it holds the head module, so FSDP's parameter swaps are seen.
        self.head = find_linear_head(model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        weights: Tensor | None = None,
        *,
        output: Literal["loss", "log_probs"] = "loss",
        with_entropy: bool = False,
        positions: Tensor | None = None,
    ) -> FusedNLL | dict[str, Tensor]:
        """input_ids, attention_mask, labels: (batch, seq) int64.

        output "loss": sum_i w_i * -log p(label_i) over positions with a non-zero weight;
        weights (batch, seq) float32, zero off the response. Returns a `FusedNLL`.
        output "log_probs": {"log_probs": (batch, seq) float32} of every label, plus
        "token_entropy" (batch, seq) float32 with `with_entropy`; differentiable. With
        `positions` (batch, seq) bool, only those go through the head; the rest read 0.
        """
        if output == "log_probs":
            return self._log_probs(input_ids, attention_mask, labels, with_entropy, positions)
        if output != "loss" or weights is None:
            raise ValueError(f"output must be 'loss' (with weights) or 'log_probs', got {output!r}")
        positions = weights != 0
        if self.head is None:
            return self._full_logits_loss(input_ids, attention_mask, labels, weights, positions)
        head = self.head
        with torch.profiler.record_function("posttrain.body"):
            hidden = body_hidden_states(self.model, input_ids, attention_mask)
        # The head's precision is set by matmul_dtype, not by an outer autocast.
        with (
            torch.autocast(hidden.device.type, enabled=False),
            torch.profiler.record_function("posttrain.head"),
        ):
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
                workspace=self.workspace,
            )

    def weights_changed(self) -> None:
        """Forget the narrowed head weight: the next call narrows the new weights."""
        self.workspace.forget_casts()

    def release_buffers(self) -> None:
        """Give the loss's scratch memory back (generation needs it more)."""
        self.workspace.release()

    def _log_probs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        with_entropy: bool,
        positions: Tensor | None,
    ) -> dict[str, Tensor]:
        out = lean_response_log_probs(
            self.model,
            input_ids,
            labels,
            attention_mask=attention_mask,
            return_token_entropy=with_entropy,
            chunk_size=self.chunk_size,
            positions=positions,
        )
        if out is not None:
            return out
        full = full_logits_log_probs(
            self.model,
            input_ids,
            labels,
            attention_mask=attention_mask,
            return_token_entropy=with_entropy,
        )
        full.pop("is_argmax")
        if positions is not None:
            full = {k: v * positions for k, v in full.items()}
        return full

    def _full_logits_loss(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        weights: Tensor,
        positions: Tensor,
    ) -> FusedNLL:
        # For heads the chunked path cannot reproduce exactly: the model's own logits.
        out = full_logits_log_probs(
            self.model,
            input_ids,
            labels,
            attention_mask=attention_mask,
            positions=positions,
            return_token_entropy=True,
        )
        log_probs = out["log_probs"]
        return FusedNLL(
            loss=-(log_probs * weights[positions]).sum(),
            nll_sum=-log_probs.detach().sum(),
            entropy_sum=out["token_entropy"].detach().sum(),
            num_correct=out["is_argmax"].sum(),
            num_tokens=int(log_probs.numel()),
        )


# objective(module, micro_batch) -> (loss, statistics): the micro-batch's share of the
# step's loss (already divided by the step's global normaliser, so that the step's
# gradient is the sum over micro-batches and ranks) and what to sum for the metrics.
Objective = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, Any]]]

# The name before the policy module served log-probs too; kept for one release.
ResponseLoss = PolicyModule


def batch_log_probs(
    module: nn.Module, batch: dict[str, Tensor], with_entropy: bool = False
) -> dict[str, Tensor]:
    """Per-token log-probs of `batch["labels"]` ("log_probs", and "token_entropy" with
    `with_entropy`), each (batch, seq) float32, through a `PolicyModule` or its DDP/FSDP
    wrapper. Only the response's positions (`batch["response_mask"] > 0`, where the batch
    has one) go through the head; the rest read 0."""
    positions = batch["response_mask"] > 0 if "response_mask" in batch else None
    return module(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        output="log_probs",
        with_entropy=with_entropy,
        positions=positions,
    )


NLL_STATISTICS = ("nll_sum", "entropy_sum", "num_correct", "num_tokens", "num_input_tokens")


def nll_statistics(out: FusedNLL, attention_mask: Tensor) -> dict[str, Tensor | int]:
    """A micro-batch's NLL statistics for `posttrain.common.sums.Sums` (no host sync):
    its summed NLL and entropy, correct and scored tokens, and input tokens."""
    return {
        "nll_sum": out.nll_sum,
        "entropy_sum": out.entropy_sum,
        "num_correct": out.num_correct,
        "num_tokens": out.num_tokens,
        "num_input_tokens": attention_mask.sum(),
    }


def nll_summary(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Mean NLL per token, mean entropy and token accuracy from summed `nll_statistics`."""
    tokens = max(totals["num_tokens"], 1.0)
    return {
        f"{prefix}nll": totals["nll_sum"] / tokens,
        f"{prefix}entropy": totals["entropy_sum"] / tokens,
        f"{prefix}token_accuracy": totals["num_correct"] / tokens,
    }
