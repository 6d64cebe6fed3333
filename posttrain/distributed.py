"""torch.distributed plumbing: process group, device, reductions, model wrapping.

A single process (no torchrun) needs none of this: `init_distributed` then returns
rank 0 of a world of 1 and every helper is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("posttrain")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL is used when every rank has a GPU; otherwise (a CPU-only machine) gloo, with
    a log line saying so.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
            logger.info("no CUDA/NCCL on this machine: using the gloo backend on the CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over all ranks (in place, and returned)."""
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap_model(module: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel over the process group; unchanged for one process."""
    if not info.is_distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
