"""The state of every random generator a training loop draws from, for exact resume.

Each rank draws from its own generators (dropout masks differ by rank, for one), so a
checkpoint keeps every rank's states (`rng_per_rank`) and rank r of a run resumed on
the same number of ranks gets rank r's back.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch


def collect_rng_state() -> dict[str, Any]:
    """The state of every random generator a training loop may draw from.

    Stored with only tensors and builtin types so that `torch.load(weights_only=True)`
    can read it back.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch_cpu": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional: nothing to save if it is not installed
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["torch_mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by `collect_rng_state`.

    Accepts either that dict or a whole trainer state (whose "rng" entry is used).
    Generators absent from `state` are left alone.
    """
    if "rng" in state:
        state = state["rng"]
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"])
    if "numpy" in state:
        import numpy as np

        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            # Restoring a subset would silently diverge; this is worth a loud error
            # only if the caller cares, so restore what matches and say so.
            import warnings

            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this "
                f"process sees {torch.cuda.device_count()}; restoring the common ones",
                stacklevel=2,
            )
        for index, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    if "torch_mps" in state and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["torch_mps"])


def rank_rng_state(
    trainer_state: Mapping[str, Any], rank: int, world_size: int
) -> tuple[Mapping[str, Any], bool]:
    """The generator states rank `rank` of a `world_size`-rank run resumes with, and
    whether they are its own: the checkpoint's rank `rank` when it was saved by as many
    ranks; otherwise (another number of ranks, or a checkpoint of an older posttrain
    that kept rank 0's only) the saved rank's of the same number where there is one,
    else rank 0's."""
    per_rank = trainer_state.get("rng_per_rank") or [trainer_state["rng"]]
    own = len(per_rank) == world_size
    return per_rank[rank] if rank < len(per_rank) else per_rank[0], own
