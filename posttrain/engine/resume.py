"""Deciding what `--resume` does: which checkpoint, whether the run is already finished,
and whether the settings changed in a way that breaks an exact resume."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.common.distributed import config_differences
from posttrain.engine.checkpoints import (
    final_step,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_config,
    load_trainer_state,
)
from posttrain.engine.settings import HOW_TO_RUN
from posttrain.models.lora import is_adapter_dir

logger = logging.getLogger("posttrain")


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: `checkpoint` None is step 0; `finished` means nothing to do."""

    checkpoint: Path | None
    finished: bool = False


def data_fingerprint(token_ids: Sequence[Sequence[int]]) -> str:
    """A short hash of the tokenized training set (ids and example boundaries)."""
    digest = hashlib.sha256()
    digest.update(np.asarray([len(ids) for ids in token_ids], dtype=np.int64).tobytes())
    for ids in token_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def find_resume_point(
    out: Path,
    *,
    resume: bool,
    resume_from: str | None,
    total_steps: int,
) -> ResumePoint:
    """The checkpoint to resume from, after the checks that keep a run safe.

    A finished run (OUTPUT_DIR/final records its step count) resumed with the same step
    count is finished: nothing to do. Asking for fewer steps than the checkpoint (or the
    finished run) has is an error, as is asking for more steps of a finished run (its
    last step has no optimizer state to continue from); neither changes anything.
    """
    if not resume:
        return ResumePoint(None)
    finished_at = final_step(out) if resume_from is None else None
    if finished_at is not None:
        if total_steps == finished_at:
            return ResumePoint(None, finished=True)
        if total_steps < finished_at:
            raise ValueError(
                f"{out} holds a run finished at step {finished_at}; max_steps {total_steps} "
                "is below that. Nothing was changed"
            )
        raise ValueError(
            f"{out} holds a run finished at step {finished_at}, and its last step keeps no "
            f"optimizer state to continue to step {total_steps} exactly. Start a new run "
            f"from its model instead (--model {out / 'final'} --output-dir NEW_DIR)"
        )
    if resume_from is not None:
        checkpoint = Path(resume_from)
        if not checkpoint.exists():
            raise ValueError(f"--resume {checkpoint}: no such checkpoint; {_existing(checkpoint)}")
        if not is_complete(checkpoint):
            raise ValueError(
                f"--resume {checkpoint}: not a complete checkpoint directory (expected "
                f"OUTPUT_DIR/checkpoints/step-NNNNNN with a COMPLETE marker)"
            )
    else:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            logger.info("--resume: no complete checkpoint in %s, starting from step 0", out)
            return ResumePoint(None)
    step = int(load_trainer_state(checkpoint)["step"])
    if step > total_steps:
        raise ValueError(
            f"the checkpoint {checkpoint} is at step {step}, past max_steps {total_steps}; "
            "nothing was changed. Pass a max_steps of at least that"
        )
    return ResumePoint(checkpoint)


def _existing(checkpoint: Path) -> str:
    """Which checkpoints the run of `checkpoint` (OUTPUT_DIR/checkpoints/step-N) has."""
    found = list_checkpoints(checkpoint.parent.parent)
    if not found:
        return f"{checkpoint.parent} holds no complete checkpoint"
    # Only the newest keep_last are kept: an older step was deleted when a newer one saved.
    return f"complete checkpoints there: {', '.join(str(p) for p in found)}"


def check_resume_settings(
    checkpoint: Path,
    current: Mapping[str, Any],
    breaks_exact_resume: Collection[str],
    problems: Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]],
    fingerprint: str,
    resume_with_changes: bool,
) -> None:
    """Log what changed since the checkpoint; refuse changes that break an exact resume
    unless `resume_with_changes`: a changed key of `breaks_exact_resume`, a different
    training set (`fingerprint`), and whatever `problems(saved_config, saved_extra)`
    names (a method's own conditions, such as its global batch)."""
    saved = load_checkpoint_config(checkpoint)
    mismatch = lora_mismatch(checkpoint, saved, current)
    if mismatch:
        raise ValueError(mismatch)
    changed = [key for key in current if key not in HOW_TO_RUN and saved.get(key) != current[key]]
    if changed:
        lines = config_differences(
            {k: saved.get(k) for k in changed}, {k: current[k] for k in changed}
        )
        logger.info("resuming with changed settings: %s", "; ".join(lines))
    breaking = [key for key in changed if key in breaks_exact_resume]
    extra = load_trainer_state(checkpoint).get("extra", {})
    extra = extra if isinstance(extra, Mapping) else {}
    breaking += problems(saved, extra)
    saved_fp = extra.get("data_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint:
        breaking.append("the training data (its tokens differ from the checkpoint's)")
    if breaking and not resume_with_changes:
        raise ValueError(
            f"cannot resume {checkpoint} exactly: changed {', '.join(breaking)}. Undo the "
            "change, or pass --resume-with-changes to continue anyway (the run will not "
            "match an uninterrupted one)"
        )


def global_batch_change(
    saved_config: Mapping[str, Any],
    saved_state: Mapping[str, Any],
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    unit: str,
) -> list[str]:
    """The global batch (micro x accumulation x ranks) as a resume problem when it differs
    from the checkpoint's, or []: a run checkpointed on N ranks resumes exactly on M with
    the micro-batch scaled to match. `unit` names what a batch counts ("examples")."""
    saved_world = saved_state.get("world_size", 1)
    saved = saved_config["micro_batch_size"] * saved_config["grad_accum_steps"] * saved_world
    batch = micro_batch_size * grad_accum_steps * world_size
    return [f"the global batch ({saved} -> {batch} {unit} per step)"] if saved != batch else []


def lora_mismatch(
    checkpoint: Path, saved: Mapping[str, Any], current: Mapping[str, Any]
) -> str | None:
    """Why the checkpoint's weights cannot go into this run's model at all, or None.

    A LoRA checkpoint holds an adapter, a full one every weight; their optimizer states
    cover different parameters, and an adapter of another rank or other target modules
    has other tensors. Unlike the changes in BREAKS_EXACT_RESUME, --resume-with-changes
    cannot help, so the message says what can.
    """
    lora_checkpoint = is_adapter_dir(checkpoint)
    new_run = f"(--model {checkpoint} --output-dir NEW_DIR)"
    if lora_checkpoint and not current["lora_r"]:
        flags = f"--lora-r {saved['lora_r']} --lora-target-modules {saved['lora_target_modules']}"
        return (
            f"{checkpoint} is a LoRA checkpoint (an adapter, lora_r {saved['lora_r']}) and "
            f"this run is full fine-tuning (lora_r 0): resume it with its LoRA settings "
            f"({flags}), or fine-tune the merged model fully in a new run {new_run}"
        )
    if current["lora_r"] and not lora_checkpoint:
        return (
            f"{checkpoint} is a full fine-tuning checkpoint and this run asks for LoRA "
            f"(lora_r {current['lora_r']}): its weights and optimizer state are the whole "
            f"model's, not an adapter's. Resume it without the LoRA flags (--lora-r 0), or "
            f"train a LoRA on its weights in a new run {new_run}"
        )
    reshaped = [
        f"{key} {saved.get(key)!r} -> {current[key]!r}"
        for key in ("lora_r", "lora_target_modules")
        if lora_checkpoint and saved.get(key) != current[key]
    ]
    if reshaped:
        return (
            f"cannot resume {checkpoint}: its adapter has other layers or shapes than this "
            f"run's ({'; '.join(reshaped)}), so its weights do not fit. Undo the change, or "
            f"train the new adapter on its merged model in a new run {new_run}"
        )
    return None
