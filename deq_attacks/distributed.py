"""Several processes through ``torchrun``: the one process-group helper of training, evaluation
and the command line.

``torchrun --nproc_per_node=K ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``start``
joins that group (nccl on CUDA, gloo on CPU) and pins the process to GPU ``LOCAL_RANK``.
Without those variables (or with ``WORLD_SIZE=1``) the work runs in this one process and every
collective below is the identity. A group that someone else initialised (a test, a user's own
launcher) is used as it is and left for them to close.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: How long a collective waits for the slowest process: rank 0 alone runs the development
#: evaluation of a training epoch and writes the outputs of an evaluation, the others wait.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """This process's place in the group and its device.

    Attributes:
        rank: 0..world-1.
        world: the number of processes.
        device: ``cpu``, or ``cuda:LOCAL_RANK``.
        owns_group: whether ``start`` initialised the process group (``finish`` then ends it).
    """

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def start(device: str) -> Processes:
    """Join the process group that torchrun describes (nccl for ``device="cuda"``, gloo for
    ``"cpu"``), or run alone; on CUDA, select GPU ``LOCAL_RANK``. Raises before any work when
    the device or the environment cannot serve."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    world = _environment_int("WORLD_SIZE", 1)
    rank = _environment_int("RANK", 0)
    local_rank = _environment_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda, but torch sees no CUDA device (use the cpu device)")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank}, but only {torch.cuda.device_count()} CUDA devices"
            )
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), where)
    if world == 1:
        return Processes(0, 1, where)
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=TIMEOUT)
    return Processes(dist.get_rank(), dist.get_world_size(), where, owns_group=True)


def finish(processes: Processes) -> None:
    """End the process group if ``start`` began it."""
    if processes.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str) -> Iterator[Processes]:
    """``start(device)`` for the duration of a ``with`` block, then ``finish``."""
    processes = start(device)
    try:
        yield processes
    finally:
        finish(processes)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world) of the initialised group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0 of the initialised group (or runs alone)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every process (nothing to wait for alone)."""
    if _active():
        dist.barrier()


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over the processes (a copy; the input is untouched). The
    tensor must be on the group's device (CUDA for nccl)."""
    total = values.clone()
    if _active():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_objects(value: T) -> list[T]:
    """Every process's ``value`` (picklable), in rank order, on every process."""
    if not _active():
        return [value]
    gathered: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered  # type: ignore[return-value]


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` (picklable) on every process (the value itself alone)."""
    if not _active():
        return value
    box: list[T] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
