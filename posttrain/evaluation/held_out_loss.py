"""Held-out evaluation during training: response-token loss, perplexity, accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from posttrain.common.devices import autocast, to_device
from posttrain.common.distributed import DistInfo, unwrap_model
from posttrain.common.sums import Sums
from posttrain.data.batching import collate
from posttrain.data.tokenized import TokenizedExample
from posttrain.models.policy import NLL_STATISTICS, nll_statistics


@torch.no_grad()
def evaluate_loss(
    loss_module: nn.Module,
    examples: Sequence[TokenizedExample],
    micro_batch_size: int,
    pad_id: int,
    info: DistInfo,
    autocast_dtype: torch.dtype | None,
    on_batch: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Response NLL per token, perplexity, entropy and token accuracy on held-out data.

    Every rank must call this: each scores its share and the sums are all-reduced.
    `on_batch` receives a short progress text after each micro-batch ("eval 40/1319").
    Returns {"eval_loss", "eval_perplexity", "eval_entropy", "eval_token_accuracy"}.
    """
    # DDP's forward may broadcast buffers, a collective: its inner module needs none.
    module = unwrap_model(loss_module)
    module.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    mine = order[info.rank :: info.world_size]
    stats = Sums(NLL_STATISTICS)
    # Under FSDP every forward all-gathers parameters, so every rank runs the same number
    # of forwards; one that has run out of examples repeats one and does not count it.
    rounds = math.ceil(math.ceil(len(examples) / info.world_size) / micro_batch_size)
    for start in range(0, rounds * micro_batch_size, micro_batch_size):
        ids = mine[start : start + micro_batch_size]
        batch = to_device(collate([examples[i] for i in ids or order[:1]], pad_id), info.device)
        with autocast(info.device, autocast_dtype):
            out = module(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                batch["response_mask"].float(),
            )
        if ids:
            stats.add(nll_statistics(out, batch["attention_mask"]))
        if on_batch is not None:
            scored = min(len(examples), (start + micro_batch_size) * info.world_size)
            on_batch(f"eval {scored}/{len(examples)}")
    module.train()
    total = stats.all_reduced(info)
    tokens = max(total["num_tokens"], 1.0)
    nll = total["nll_sum"] / tokens
    return {
        "eval_loss": nll,
        "eval_perplexity": math.exp(min(nll, 700.0)),
        "eval_entropy": total["entropy_sum"] / tokens,
        "eval_token_accuracy": total["num_correct"] / tokens,
    }
