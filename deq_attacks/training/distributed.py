"""Several processes through ``torchrun``: one process per GPU (nccl) or per CPU group (gloo).

``torchrun --nproc_per_node=K -m deq_attacks train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them (or with WORLD_SIZE=1) training runs in this one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from deq_attacks.training.config import Device


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start(device: Device) -> Processes:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is Device.CUDA:
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda, but torch sees no CUDA device (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices"
            )
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # the other ranks wait at a barrier while rank 0 runs the dev evaluation
        dist.init_process_group(
            backend="nccl" if device is Device.CUDA else "gloo", timeout=timedelta(hours=2)
        )
    return Processes(rank, world, where)


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


def sum_over_processes(values: torch.Tensor, processes: Processes) -> torch.Tensor:
    """Element-wise sum of ``values`` over all processes (a copy; the input is untouched)."""
    total = values.clone()
    if processes.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_flag(flag: bool, processes: Processes) -> bool:
    """Rank 0's value of ``flag`` on every process."""
    if not processes.distributed:
        return flag
    box = torch.tensor([1 if flag else 0], device=processes.device)
    dist.broadcast(box, src=0)
    return bool(box.item())


def finish(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()
