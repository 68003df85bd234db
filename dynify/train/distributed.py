"""Processes: one, or several under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc-per-node N -m dynify finetune ...`` (or several machines with
``--nnodes``/``--rdzv-endpoint``) sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the process
group is then started with timm's ``init_distributed_device_so`` (nccl on GPUs, gloo on the
CPU), each process takes the GPU of its local rank, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dynify._device import resolve_device

__all__ = ["Processes", "is_primary_process", "resolve_device", "start_processes"]


@dataclass
class Processes:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # Whether this module started the process group (and so ends it).
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over the processes (in place; a no-op for one process)."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(device: str | torch.device | None) -> Processes:
    """Join (or start, under torchrun) the process group; one process otherwise."""
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        # The caller started the group (e.g. a search worker): use it as it is.
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return Processes(
            dev,
            dist.get_rank(),
            int(os.environ.get("LOCAL_RANK", 0)),
            dist.get_world_size(),
            owns_group=False,
        )
    from timm.utils.distributed import init_distributed_device_so, is_distributed_env

    if not is_distributed_env():
        return Processes(dev)

    info = init_distributed_device_so(device=dev.type)
    return Processes(
        torch.device(info["device"]),
        int(info["global_rank"]),
        int(info["local_rank"]),
        int(info["world_size"]),
        owns_group=True,
    )


def is_primary_process() -> bool:
    """Whether this process is rank 0 (of the started process group, else of ``RANK`` as
    torchrun sets it; a lone process is): the one that writes files and reports."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
