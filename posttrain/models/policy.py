"""The SFT training loss: response-token NLL through the fused chunked kernel.

`ResponseLoss` wraps the model and its loss in one module so that DDP and FSDP see a
single forward per micro-batch; `loss_weights` and `step_denominator` normalise the loss
by the globally counted response tokens (or sequences) of an optimizer step, so that the
step's gradient is the same however the step is split into micro-batches and ranks;
`StepStats` sums a step's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from posttrain.common.distributed import DistInfo, all_reduce_sum
from posttrain.models.heads import body_hidden_states, find_linear_head
from posttrain.ops.fused_nll import FusedNLL, fused_linear_nll
from posttrain.ops.workspace import Workspace
from posttrain.primitives import full_logits_log_probs


class ResponseLoss(nn.Module):
    """The model plus its response-token loss, as one module.

    Wrapping both in one `forward` lets DDP and FSDP see a single forward per
    micro-batch (their hooks fire on it), while the loss never builds the full
    (batch, seq, vocab) logits: only response positions go through the head.

    chunk_size: rows of logits per chunk (None: from the memory budget); matmul_dtype:
    dtype of the head matmuls (None: the weights' dtype, torch.bfloat16 to narrow them).
    `workspace` keeps the head's chunk buffers and narrowed weight between calls; whoever
    changes the weights calls its `forget_casts()` (the training loop does, after each
    optimizer step).
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
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, weights: Tensor
    ) -> FusedNLL:
        """Loss sum_i w_i * -log p(label_i) over positions with a non-zero weight.

        input_ids, attention_mask, labels: (batch, seq) int64; weights: (batch, seq)
        float32, zero off the response.
        """
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
    batches: Sequence[dict[str, Tensor]], normalization: str, info: DistInfo
) -> float:
    """The global count that normalises a step's loss: response tokens or sequences."""
    if normalization == "token":
        local = sum(float(b["response_mask"].sum()) for b in batches)
    else:
        local = sum(float((b["response_mask"].sum(-1) > 0).sum()) for b in batches)
    total = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=info.device), info)
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

    def all_reduced(self, info: DistInfo) -> StepStats:
        values = torch.tensor(astuple(self), dtype=torch.float64, device=info.device)
        return StepStats(*all_reduce_sum(values, info).tolist())

    @property
    def mean_entropy(self) -> float:
        return self.entropy_sum / max(self.num_tokens, 1.0)

    @property
    def token_accuracy(self) -> float:
        return self.num_correct / max(self.num_tokens, 1.0)
