"""torch.distributed plumbing: process group, device, reductions, model wrapping, state.

A single process (no torchrun) needs none of this: `init_distributed` then returns
rank 0 of a world of 1 and every helper is a no-op (or the plain single-process call).

Under torchrun the model is wrapped by one of two strategies (the `strategy` setting):

- `ddp`: `DistributedDataParallel`. Every rank holds the whole model, its gradients and
  the optimizer state; gradients are all-reduced once per optimizer step.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`). Each decoder layer and then the
  root are sharded, so parameters, gradients and optimizer state are split over the
  ranks and gathered one layer at a time for compute.

Checkpoints are always written as full (unsharded) state: a Hugging Face model
directory plus an optimizer state keyed by parameter name. That is what lets a run
saved with N ranks resume with M ranks (or one process) under either strategy.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("posttrain")

# Optimizer options that describe how this process runs the update, not what it
# learned; a checkpoint's values for them are replaced by the current optimizer's.
_IMPLEMENTATION_OPTIONS = ("fused", "foreach", "capturable", "differentiable")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device.

    `owns_group` is True when `init_distributed` created the process group (and
    `shutdown` should destroy it); a group made by the caller is left alone.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL is used when every rank has a GPU; otherwise (a CPU-only machine) gloo, with
    a log line saying so. A process group the caller already initialised is used as is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size <= 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, 0, device)
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "nccl"
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        backend = "gloo"
        device = torch.device("cpu")
        if rank == 0:
            why = "no CUDA GPU" if not torch.cuda.is_available() else "NCCL is not available"
            logger.info("%s on this machine: using the gloo backend on the CPU", why)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank, device, owns_group)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over all ranks (in place, and returned)."""
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of `tensor` over all ranks (in place, and returned)."""
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (a small picklable value, e.g. a path)."""
    if not info.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's `obj` (a small picklable value), in rank order, on rank 0; None on
    the other ranks. Every rank must call this."""
    if not info.is_distributed:
        return [obj]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` (a small picklable value), in rank order, on every rank."""
    if not info.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def config_differences(reference: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """`name: a != b` for each setting that differs between two config dicts."""
    names = list(reference) + [k for k in other if k not in reference]
    return [
        f"{name}: {reference.get(name)!r} != {other.get(name)!r}"
        for name in names
        if reference.get(name) != other.get(name)
    ]


def check_same_config(config: Mapping[str, Any], info: DistInfo) -> None:
    """Raise on every rank if any rank resolved a different config than rank 0.

    Ranks that train with different settings (a stale YAML on one node, a different
    flag) would otherwise run, silently averaging gradients of different problems,
    or hang in a collective that only some of them reach.
    """
    if not info.is_distributed:
        return
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, dict(config))
    problems = []
    for rank, other in enumerate(gathered[1:], start=1):
        diffs = config_differences(gathered[0], other)
        if diffs:
            problems.append(f"rank {rank} vs rank 0: {'; '.join(diffs[:5])}")
    if problems:
        raise ValueError(
            "ranks disagree on the config (every rank must resolve the same settings; "
            "check the --config file and flags on each node): " + " | ".join(problems)
        )


# --------------------------------------------------------------------------- wrapping


def _layer_classes(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks (Hugging Face `_no_split_modules`)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def wrap_model(
    module: nn.Module,
    info: DistInfo,
    strategy: str = "ddp",
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Wrap `module` for data-parallel training; unchanged for one process.

    ddp: `DistributedDataParallel`. fsdp: FSDP2, `fully_shard` on each transformer
    block and then on `module` itself, which therefore owns the embeddings, the final
    norm and the output head (so tied embeddings stay one parameter, and the fused
    loss sees the head's full weight while the root is gathered for its forward).
    `param_dtype` (bf16) is FSDP's compute dtype for parameters; gradients are still
    reduced in float32.

    A LoRA (peft) model needs nothing else. DDP registers its gradient hooks on the
    parameters that require grad only, and every adapter is used in every forward, so
    `find_unused_parameters` stays off. FSDP2 shards frozen and trainable parameters of
    a block together and reduce-scatters only the gradients that exist; the frozen head
    still lives in the root unit, gathered whole for the fused loss.
    """
    if not info.is_distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    if strategy != "fsdp":
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    layer_classes = _layer_classes(module)
    layers = [m for m in module.modules() if type(m).__name__ in layer_classes]
    if not layers and info.is_main:
        logger.info(
            "fsdp: no transformer blocks found (no _no_split_modules); sharding the whole "
            "model as one unit, which gathers all of it at once"
        )
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def is_fsdp(module: nn.Module) -> bool:
    """Whether `module` was sharded with FSDP2's `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Under FSDP, hold the root's parameters (embeddings, norm, head) gathered: Hugging
    Face `generate` calls the model below the root, whose forward hook would otherwise
    gather them. The decoder layers gather themselves. A no-op for other modules."""
    if not is_fsdp(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside DDP and `torch.compile` wrappers: for saving, and for forwards
    that must not synchronise."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if hasattr(module, "_orig_mod"):  # torch.compile
            module = module._orig_mod
        elif isinstance(module, DistributedDataParallel):
            module = module.module
        else:
            return module


# --------------------------------------------------------------------------- state


def _full_options(trainable_only: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload keeps the gathered copy on rank 0 only, in host memory.
    return StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )


def full_model_state_dict(
    model: nn.Module, sharded: bool, trainable_only: bool = False
) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 when `sharded` (FSDP), else None.

    Every rank must call this (it all-gathers the shards). None means the model's own
    parameters are already whole and can be saved directly. `trainable_only` gathers
    only the parameters that require grad (a LoRA model's adapters: megabytes, where the
    frozen base would be gigabytes that a checkpoint does not need).
    """
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(trainable_only))
    # A tied parameter (lm_head = embeddings) appears under each of its names; the
    # Hugging Face format stores it once, and a second copy can be a gigabyte.
    unique = {name for name, _ in model.named_parameters()}
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state, unsharded and keyed by parameter name (whole on rank 0).

    Every rank must call this. Names rather than positions, and whole rather than
    sharded tensors, make the state loadable by any number of ranks and either
    strategy.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load a state from `full_optimizer_state_dict` (or a plain `state_dict()`).

    Every rank passes the whole state; under FSDP each keeps its own shard. The
    current optimizer's implementation options (fused, foreach) are kept: the saving
    run may have used sharded parameters, for which the fused kernel is unavailable.
    """
    groups = [dict(saved) for saved in state["param_groups"]]
    for saved, current in zip(groups, optimizer.param_groups, strict=False):
        for option in _IMPLEMENTATION_OPTIONS:
            if option in current:
                saved[option] = current[option]
    state = {**state, "param_groups": groups}
    if all(isinstance(p, int) for group in groups for p in group["params"]):
        # A positional state dict from `optimizer.state_dict()` (older checkpoints).
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op for one process)."""
    if info.is_distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if info.is_distributed and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
