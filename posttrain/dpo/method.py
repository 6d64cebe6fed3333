"""DPO as a method on the engine: pairs batched whole, one forward per micro-batch, and a
reference that costs no second model.

Full fine-tuning: before the first step the starting weights score every training and
evaluation pair once (`reference_logps.pt` in the run directory, keyed on the model and
the data), so no reference model is held while training and a resumed run reuses the
scores. LoRA: the reference is the model with its adapters disabled, one extra
gradient-free forward per micro-batch, nothing stored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from posttrain.common.devices import to_device
from posttrain.common.distributed import DistInfo, all_gather_objects
from posttrain.common.sums import Sums
from posttrain.config.dpo import DPOConfig
from posttrain.data.batching import EpochPlan, collate, plan_batches, rank_micro_batches
from posttrain.data.pairs import PairFormat, PreferencePair, load_pairs
from posttrain.engine.method import Hook, Method
from posttrain.engine.resume import data_fingerprint, global_batch_change
from posttrain.engine.run import Run
from posttrain.evaluation.hooks import GenerationEvalHook, generation_eval_hooks
from posttrain.losses.dpo import DPOLoss, dpo_metrics, dpo_objective

logger = logging.getLogger("posttrain")

REFERENCE_FILE = "reference_logps.pt"
# The keys of `dpo_metrics`, logged by a step and, with an `eval_` prefix, by the
# evaluation on eval_file -> what each means (per pair: a mean over the pairs).
DPO_METRICS: dict[str, str] = {
    "loss": "the DPO loss (loss_type), mean over the pairs",
    "rewards_chosen": "implicit reward of the chosen responses: beta x (policy - reference) "
    "log-prob (ipo: per token), mean",
    "rewards_rejected": "the same for the rejected responses",
    "reward_margin": "rewards_chosen - rewards_rejected",
    "reward_accuracy": "share of pairs whose chosen response has the higher implicit reward",
    "logps_chosen": "the policy's summed log-prob of the chosen response (ipo: per token), mean",
    "logps_rejected": "the same for the rejected response",
}
# Pairs per reference-scoring forward, as a multiple of the training micro-batch.
REFERENCE_BATCH_FACTOR = 4
DPO_BREAKS_EXACT_RESUME = (
    "train_file",
    "prompt_field",
    "chosen_field",
    "rejected_field",
    "max_seq_len",
    "truncation",
    "append_eos",
    "group_by_length",
    "beta",
    "loss_type",
    "label_smoothing",
)


def pair_batch(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, Tensor]:
    """One micro-batch of whole pairs: the chosen sequences, then the rejected ones
    (`collate`'s tensors, (2 x pairs, seq)), and `pair_weights` (pairs,) of 1."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["pair_weights"] = torch.ones(len(pairs))
    return batch


@dataclass
class ReferenceScores:
    """The starting model's summed response log-probs and response token counts of every
    pair, (pairs, 2) float64: column 0 the chosen response, column 1 the rejected one."""

    logps: Tensor
    tokens: Tensor

    def of(self, indices: Sequence[int], length_normalised: bool) -> Tensor:
        """(2 x len(indices),) float32: chosen ones, then rejected ones, as in a batch."""
        rows = self.logps[list(indices)]
        if length_normalised:
            rows = rows / self.tokens[list(indices)].clamp(min=1)
        return torch.cat([rows[:, 0], rows[:, 1]]).float()


class DPO(Method):
    """Direct Preference Optimization on prompt/chosen/rejected pairs (`posttrain dpo`)."""

    command = "dpo"
    breaks_exact_resume = DPO_BREAKS_EXACT_RESUME
    metrics: ClassVar[Mapping[str, str]] = {
        **DPO_METRICS,
        "tokens_per_s": "input tokens (padding excluded) per second of the step, all ranks",
        "epoch": "passes over the pairs done before this step (fractional)",
    }

    def __init__(self, config: DPOConfig) -> None:
        self.config = config
        self.loss = DPOLoss(config.beta, config.loss_type, config.label_smoothing)
        self.pairs: list[PreferencePair] = []
        self.eval_pairs: list[PreferencePair] = []
        self.reference: ReferenceScores | None = None
        self.info: DistInfo | None = None
        self.plans: dict[int, EpochPlan] = {}

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def prepare(self, tokenizer: Any, info: DistInfo) -> int:
        c = self.config
        fmt = PairFormat(
            c.prompt_field,
            c.chosen_field,
            c.rejected_field,
            c.max_seq_len,
            c.truncation,
            c.append_eos,
        )
        self.pairs = load_pairs(c.train_file, tokenizer, fmt)
        if c.eval_file:
            self.eval_pairs = load_pairs(c.eval_file, tokenizer, fmt)
        if len(self.pairs) < info.world_size:
            raise ValueError(
                f"{c.train_file} has {len(self.pairs)} pair(s), fewer than the "
                f"{info.world_size} ranks: every rank needs a pair per step"
            )
        self.info = info
        return c.max_steps or math.ceil(c.epochs * len(self.plan(0)))

    def plan(self, epoch: int) -> EpochPlan:
        """The optimizer steps of `epoch`: global micro-batches of pair indices."""
        if epoch not in self.plans:
            self.plans.clear()
            c, info = self.config, self._info()
            self.plans[epoch] = plan_batches(
                [len(p) for p in self.pairs],
                c.micro_batch_size,
                c.grad_accum_steps,
                info.world_size,
                c.seed,
                epoch,
                c.group_by_length,
            )
        return self.plans[epoch]

    def _info(self) -> DistInfo:
        if self.info is None:
            raise RuntimeError("DPO.prepare has not run")
        return self.info

    def fingerprint(self) -> str:
        sequences = [s for p in self.pairs for s in (p.chosen.input_ids, p.rejected.input_ids)]
        return data_fingerprint(sequences)

    def log_plan(self, run: Run) -> None:
        c = self.config
        logger.info(
            "%d pairs, global batch %d pairs (%d x %d x %d ranks), %d steps; %s loss, beta %g; "
            "reference: %s",
            len(self.pairs),
            c.micro_batch_size * c.grad_accum_steps * run.info.world_size,
            c.micro_batch_size,
            c.grad_accum_steps,
            run.info.world_size,
            run.total_steps,
            c.loss_type,
            c.beta,
            "the model with its LoRA adapters disabled"
            if c.lora_r
            else "the starting weights' scores of every pair, computed once",
        )

    def resume_problems(
        self, saved_config: Mapping[str, Any], saved_state: Mapping[str, Any], world_size: int
    ) -> list[str]:
        c = self.config
        return global_batch_change(
            saved_config, saved_state, c.micro_batch_size, c.grad_accum_steps, world_size, "pairs"
        )

    def setup(self, run: Run) -> None:
        if self.config.lora_r:
            return  # the reference is the model with its adapters disabled
        self.reference = load_or_score_reference(
            run, [*self.pairs, *self.eval_pairs], self.fingerprint(), self.config
        )

    def step(self, run: Run, step: int) -> dict[str, float]:
        started = time.monotonic()
        info = run.info
        plan = self.plan(step // len(self.plan(0)))
        micro = rank_micro_batches(
            plan[step % len(plan)], self.config.micro_batch_size, info.world_size, info.rank
        )
        pairs_in_step = sum(len(ids) for ids in plan[step % len(plan)])
        batches = [self._batch(run, ids) for ids in micro]
        totals = run.accumulate(batches, dpo_objective(self.loss, pairs_in_step))
        total = totals.all_reduced(info)
        grad_norm, lr = run.optimizer_step(total["loss"], step + 1)
        row = dpo_metrics(total)
        row.update(
            grad_norm=grad_norm,
            lr=lr,
            tokens_per_s=total["num_input_tokens"] / (time.monotonic() - started),
            epoch=step / len(self.plan(0)),
        )
        return row

    def _batch(self, run: Run, ids: Sequence[int], offset: int = 0) -> dict[str, Tensor]:
        """Pairs `ids` (of the training pairs, or of the evaluation pairs with `offset`
        their place after them in the reference scores) on the device, with their
        reference log-probs."""
        source = self.pairs if offset == 0 else self.eval_pairs
        batch = to_device(pair_batch([source[i] for i in ids], run.pad_id), run.info.device)
        ipo = self.config.loss_type == "ipo"
        if self.reference is not None:
            indices = [offset + i for i in ids]
            batch["ref_logps"] = self.reference.of(indices, ipo).to(run.info.device)
        else:
            batch["ref_logps"] = reference_sequence_logps(run, batch, ipo)
        return batch

    def hooks(self, run: Run) -> list[Hook]:
        c = self.config
        hooks: list[Hook] = []
        if self.eval_pairs:
            hooks.append(DPOEvalHook(self, c.eval_every))
        hooks += generation_eval_hooks(c, run.tokenizer, run.out, announce=run.info.is_main)
        return hooks


def rank_chunks(count: int, size: int, info: DistInfo) -> list[tuple[int, list[int], bool]]:
    """This rank's share of `count` items cut into chunks of `size`: (chunk index, item
    indices, real). Chunk c goes to rank c mod W; every rank gets as many chunks (FSDP
    gathers in each forward), a rank past the end repeating chunk 0 with real False."""
    chunks = [list(range(i, min(i + size, count))) for i in range(0, count, size)]
    rounds = math.ceil(len(chunks) / info.world_size)
    mine = []
    for r in range(rounds):
        index = r * info.world_size + info.rank
        real = index < len(chunks)
        mine.append((index, chunks[index] if real else chunks[0], real))
    return mine


@dataclass
class DPOEvalHook:
    """The training metrics on the held-out pairs, with an `eval_` prefix."""

    method: DPO
    every: int

    metrics: ClassVar[Mapping[str, str]] = {
        f"eval_{key}": f"{meaning}, on the held-out pairs" for key, meaning in DPO_METRICS.items()
    }

    def __call__(self, run: Run, done: int, status: Callable[[str], None]) -> dict[str, float]:
        method, info = self.method, run.info
        pairs = method.eval_pairs
        size = method.config.micro_batch_size
        objective = dpo_objective(method.loss, len(pairs))
        sums = Sums()
        run.module.eval()
        with torch.no_grad():
            for r, (_, ids, real) in enumerate(rank_chunks(len(pairs), size, info)):
                batch = method._batch(run, ids, offset=len(method.pairs))
                if not real:  # a repeat that keeps the ranks' forwards in step: weight 0
                    batch["pair_weights"] = torch.zeros_like(batch["pair_weights"])
                loss, statistics = objective(run.module, batch)
                sums.add({"loss": loss, **statistics})
                status(f"eval {min(len(pairs), (r + 1) * size * info.world_size)}/{len(pairs)}")
        run.module.train()
        return dpo_metrics(sums.all_reduced(info), prefix="eval_")


DPO.hook_types = (DPOEvalHook, GenerationEvalHook)


def reference_sequence_logps(run: Run, batch: dict[str, Tensor], ipo: bool) -> Tensor:
    """(rows,) float32: the reference's summed (for ipo: mean) response log-probs."""
    logps = run.reference_log_probs(batch)
    mask = batch["response_mask"]
    sums = (logps * mask).sum(-1)
    return sums / mask.sum(-1).clamp(min=1) if ipo else sums


def load_or_score_reference(
    run: Run, pairs: Sequence[PreferencePair], fingerprint: str, config: DPOConfig
) -> ReferenceScores:
    """The reference scores of `pairs` from the run directory, or computed now with the
    starting weights (a fresh run's, before its first step) and saved there."""
    path = run.out / REFERENCE_FILE
    key = {"model": str(Path(config.model).resolve()), "data": fingerprint, "pairs": len(pairs)}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return ReferenceScores(saved["logps"], saved["tokens"])
    if run.start_step > 0:
        raise ValueError(
            f"{path} is missing or was made for other data or another model, and the "
            "weights are no longer the starting ones to compute it from: start a new run"
        )
    # No gradients, so no activations kept: larger batches than training's cost little
    # memory and amortise each forward's overhead.
    scores = score_pairs(run, pairs, config.micro_batch_size * REFERENCE_BATCH_FACTOR)
    if run.info.is_main:
        tmp = path.with_name(f"{path.name}.tmp")
        torch.save({"key": key, "logps": scores.logps, "tokens": scores.tokens}, tmp)
        tmp.replace(path)
        logger.info("reference: scored %d pairs with the starting weights -> %s", len(pairs), path)
    return scores


def score_pairs(run: Run, pairs: Sequence[PreferencePair], size: int) -> ReferenceScores:
    """Every pair's summed response log-probs under the current (starting) weights, lean,
    split over the ranks and gathered. Every rank must call this."""
    info = run.info
    mine: list[tuple[list[int], list[float], list[float]]] = []
    run.module.eval()
    for _, ids, real in rank_chunks(len(pairs), size, info):
        batch = to_device(pair_batch([pairs[i] for i in ids], run.pad_id), info.device)
        mask = batch["response_mask"]
        sums = (run.log_probs(batch)["log_probs"] * mask).sum(-1).double().cpu()
        if real:
            mine.append((ids, sums.tolist(), mask.sum(-1).double().cpu().tolist()))
    run.module.train()
    logps = torch.zeros(len(pairs), 2, dtype=torch.float64)
    tokens = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for part in all_gather_objects(mine, info):
        for ids, values, counts in part:
            half = len(ids)
            logps[ids] = torch.tensor([values[:half], values[half:]], dtype=torch.float64).T
            tokens[ids] = torch.tensor([counts[:half], counts[half:]], dtype=torch.float64).T
    return ReferenceScores(logps, tokens)
