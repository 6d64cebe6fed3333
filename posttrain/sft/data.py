"""SFT's data source: tokenized examples, batched per optimizer step, epoch after epoch.

The plan of an epoch (which examples form each step, and each rank's micro-batches of
it) is a function of the seed, the epoch and the world size alone, so a resumed run
picks up at any step with no saved position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from posttrain.common.devices import to_device
from posttrain.common.distributed import DistInfo
from posttrain.data.batching import (
    EpochPlan,
    collate,
    epoch_padding_fractions,
    plan_batches,
    rank_micro_batches,
)
from posttrain.data.records import DataFormat, load_records
from posttrain.data.report import boundary_warning
from posttrain.data.tokenized import (
    TokenizedExample,
    load_dataset_for_training,
    tokenize_for_training,
)
from posttrain.engine.resume import data_fingerprint

logger = logging.getLogger("posttrain")

# Pairs checked at start for prompt/response boundaries that tokenize differently apart
# than joined (`data.report.boundary_warning`).
BOUNDARY_CHECK_PAIRS = 2000


@dataclass(frozen=True)
class Batching:
    """How examples are grouped into optimizer steps."""

    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    group_by_length: bool


@dataclass
class SFTData:
    """The tokenized training examples and their per-epoch plans, for one rank."""

    examples: list[TokenizedExample]
    batching: Batching
    info: DistInfo
    pad_id: int
    plans: dict[int, EpochPlan] = field(default_factory=dict)

    def plan(self, epoch: int) -> EpochPlan:
        """The steps of `epoch` (the latest epoch's plan is kept)."""
        if epoch not in self.plans:
            self.plans.clear()
            b = self.batching
            self.plans[epoch] = plan_batches(
                [len(e.input_ids) for e in self.examples],
                b.micro_batch_size,
                b.grad_accum_steps,
                self.info.world_size,
                b.seed,
                epoch,
                b.group_by_length,
            )
        return self.plans[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.plan(0))

    def batches(self, step: int) -> list[dict[str, Tensor]]:
        """This rank's micro-batches of optimizer step `step` (0-based), on the device."""
        epoch, index = divmod(step, self.steps_per_epoch)
        info = self.info
        micro = rank_micro_batches(
            self.plan(epoch)[index], self.batching.micro_batch_size, info.world_size, info.rank
        )
        examples = self.examples
        return [
            to_device(collate([examples[i] for i in ids], self.pad_id), info.device)
            for ids in micro
        ]

    def fingerprint(self) -> str:
        return data_fingerprint([e.input_ids for e in self.examples])


def load_training_examples(
    path: str, tokenizer: Any, fmt: DataFormat, info: DistInfo
) -> list[TokenizedExample]:
    """Read, check and tokenize the training file; report it (and suspicious prompt/
    response boundaries) on rank 0."""
    records = load_records(path, fmt)
    examples, report = tokenize_for_training(records, tokenizer, fmt, path)
    if info.is_main:
        logger.info("%s", report.summary())
        # A sample bounds the start-up cost (it tokenizes each pair twice more, about 1 s
        # per 1,000 pairs); the warning is about a fraction, which a sample estimates.
        warning = boundary_warning(records[:BOUNDARY_CHECK_PAIRS], tokenizer)
        if warning:
            logger.warning("%s", warning)
    if len(examples) < info.world_size:
        raise ValueError(
            f"the training set has {len(examples)} example(s) after filtering, fewer "
            f"than the {info.world_size} ranks: every rank needs at least one example per "
            "step. Use more data or fewer processes (--nproc_per_node)"
        )
    return examples


def load_eval_examples(
    path: str, tokenizer: Any, fmt: DataFormat, limit: int | None
) -> list[TokenizedExample]:
    """The first `limit` examples of the evaluation file: the same subset at every
    evaluation and in every run."""
    return load_dataset_for_training(path, tokenizer, fmt)[0][:limit]


def log_data_plan(
    examples: Sequence[TokenizedExample],
    plan: EpochPlan,
    total_steps: int,
    batching: Batching,
    world_size: int,
) -> None:
    """Log what the data became and how it is batched, once at start."""
    in_order, grouped = epoch_padding_fractions(
        [len(e.input_ids) for e in examples],
        batching.micro_batch_size,
        batching.grad_accum_steps,
        world_size,
        batching.seed,
    )
    logger.info(
        "%d examples, global batch %d (%d x %d x %d ranks), %d steps; padding %.1f%% of "
        "tokens%s (%.1f%% in file order)",
        len(examples),
        batching.micro_batch_size * batching.grad_accum_steps * world_size,
        batching.micro_batch_size,
        batching.grad_accum_steps,
        world_size,
        total_steps,
        100 * (grouped if batching.group_by_length else in_order),
        " with length grouping" if batching.group_by_length else "",
        100 * in_order,
    )
    if plan.left_out:
        logger.info(
            "the last step of each epoch leaves out %d example(s): its size is not a "
            "multiple of the %d ranks",
            plan.left_out,
            world_size,
        )
