"""Which examples form each optimizer step, one rank's share, and collation into tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from posttrain.data.tokenized import TokenizedExample
from posttrain.primitives import pad_and_shift

# Length grouping sorts windows of this many global batches by length: large enough
# that batches hold examples of similar length, small enough that a step's examples
# still come from a random part of the data set (so steps are not ordered by length).
GROUPING_WINDOW_BATCHES = 50


@dataclass(frozen=True)
class EpochPlan(Sequence[list[list[int]]]):
    """The optimizer steps of one epoch, as a sequence: plan[step][round] = example indices.

    `left_out`: examples of the epoch in no step (the tail's remainder modulo the world
    size, since every rank needs an example per micro-batch).
    """

    steps: list[list[list[int]]]
    left_out: int

    def __getitem__(self, index):  # type: ignore[override]
        return self.steps[index]

    def __len__(self) -> int:
        return len(self.steps)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _split_step(step: np.ndarray, lengths: np.ndarray, per_round: int) -> list[list[int]]:
    """Sort a step's examples by length (longest first, ties by index) and cut them into
    global micro-batches of `per_round` (micro x ranks); a smaller final step is cut into
    as few rounds as needed, of sizes that differ by at most one."""
    order = np.lexsort((step, -lengths[step]))
    ordered = step[order].tolist()
    n = len(ordered)
    rounds = math.ceil(n / per_round)
    return [ordered[r * n // rounds : (r + 1) * n // rounds] for r in range(rounds)]


def plan_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = True,
) -> EpochPlan:
    """The optimizer steps of one epoch: per step, its global micro-batches of indices.

    A global micro-batch holds `micro_batch_size * world_size` example indices (one
    accumulation round over all ranks, sorted longest first); a step holds
    `grad_accum_steps` of them. `rank_micro_batches` deals them to ranks.

    Which examples form each step depends only on (seed, epoch, lengths, group_by_length)
    and the global batch size G = micro x accum x world, never on how G is split:
    the indices are shuffled with the seed; with `group_by_length`, each window of
    `GROUPING_WINDOW_BATCHES` x G shuffled examples is sorted by length and cut into
    batches of G (so each batch holds examples of similar length), the batches are
    shuffled, and the one holding the longest example goes first (an out-of-memory error
    shows at step 1, not hours later). Within a step, examples are sorted by length before
    being cut into micro-batches, so each micro-batch pads little.

    The tail (fewer than G examples) is kept as a smaller last step, less the remainder
    modulo `world_size` (so every rank gets at least one example per micro-batch); its
    micro-batches may be smaller than `micro_batch_size`.

    Returns:
        An `EpochPlan`: plan[step][round] = list of example indices (len <= micro x world),
        and `plan.left_out`, the examples of the epoch in no step.
    """
    _check_positive(
        micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, world_size=world_size
    )
    if epoch < 0 or seed < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    global_batch = micro_batch_size * grad_accum_steps * world_size
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if group_by_length:
        window = global_batch * GROUPING_WINDOW_BATCHES
        order = np.concatenate(
            [
                chunk[np.argsort(-lens[chunk], kind="stable")]
                for chunk in (order[s : s + window] for s in range(0, n, window))
            ]
            or [order]
        )
    n_full = n // global_batch * global_batch
    batches = [order[s : s + global_batch] for s in range(0, n_full, global_batch)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if group_by_length and batches:
        longest = max(range(len(batches)), key=lambda i: int(lens[batches[i]].max()))
        batches[0], batches[longest] = batches[longest], batches[0]
    tail = order[n_full:]
    kept = len(tail) // world_size * world_size
    left_out = len(tail) - kept
    if kept:
        batches.append(tail[:kept])
    per_round = micro_batch_size * world_size
    return EpochPlan([_split_step(b, lens, per_round) for b in batches], left_out)


def rank_micro_batches(
    step_examples: Sequence[Sequence[int]],
    micro_batch_size: int,
    world_size: int = 1,
    rank: int = 0,
) -> list[list[int]]:
    """One rank's micro-batches of a step from `plan_batches`: one per global micro-batch.

    Each global micro-batch (sorted longest first) is cut into `world_size` contiguous
    slices of equal size (differing by at most one in a smaller last step), so every rank
    runs the same number of forward/backward passes on examples of similar length.
    """
    _check_positive(micro_batch_size=micro_batch_size, world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    out = []
    for batch in step_examples:
        n = len(batch)
        if not world_size <= n <= micro_batch_size * world_size:
            raise ValueError(
                f"a global micro-batch of {n} examples cannot be split into {world_size} "
                f"micro-batches of at most {micro_batch_size}"
            )
        out.append(list(batch[rank * n // world_size : (rank + 1) * n // world_size]))
    return out


def padding_fraction(batches_of_lengths: Sequence[Sequence[int]]) -> float:
    """Fraction of the padded token slots that are padding, over all batches.

    Each batch is padded to its longest sequence: 1 - sum(lengths) / sum(len * max).
    """
    slots = sum(len(b) * max(b) for b in batches_of_lengths if len(b))
    if slots == 0:
        return 0.0
    real = sum(sum(b) for b in batches_of_lengths)
    return 1.0 - real / slots


def epoch_padding_fractions(
    lengths: Sequence[int],
    micro_batch_size: int,
    grad_accum_steps: int = 1,
    world_size: int = 1,
    seed: int = 0,
) -> tuple[float, float]:
    """(in order, length-grouped) padding fractions of one epoch's micro-batches.

    In order: consecutive examples in file order, `micro_batch_size` at a time.
    Grouped: every rank's micro-batches under `plan_batches(..., group_by_length=True)`.
    """
    in_order = [
        list(lengths[s : s + micro_batch_size]) for s in range(0, len(lengths), micro_batch_size)
    ]
    grouped = []
    for step in plan_batches(
        lengths, micro_batch_size, grad_accum_steps, world_size, seed, 0, group_by_length=True
    ):
        for rank in range(world_size):
            for mb in rank_micro_batches(step, micro_batch_size, world_size, rank):
                grouped.append([lengths[i] for i in mb])
    return padding_fraction(in_order), padding_fraction(grouped)


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, Tensor]:
    """Pad and shift a micro-batch with the primitives' `pad_and_shift`.

    Returns:
        `input_ids` (batch, max_len - 1) int64, `labels` (batch, max_len - 1) int64,
        `response_mask` (batch, max_len - 1) float32 (1 where `labels` is a trained target)
        and `attention_mask` (batch, max_len - 1) int64 (1 on real input tokens), where
        `max_len` is the longest example in tokens.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    batch = pad_and_shift(
        [e.input_ids for e in examples], [e.loss_mask for e in examples], pad_token_id
    )
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    positions = torch.arange(batch["input_ids"].shape[1], dtype=torch.int64)
    batch["attention_mask"] = (positions[None, :] < lengths[:, None]).to(torch.int64)
    return batch
