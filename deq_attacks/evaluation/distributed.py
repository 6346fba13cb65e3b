"""Sharding an evaluation across processes (``torchrun``): blocks of samples by index.

The samples are cut into contiguous blocks of ``block_size``; rank r takes blocks r, r+K, ...
Every attack runs on one block at a time and draws its randomness from the block's global
position, so a block's results do not depend on which process ran it or on what else that
process ran: the gathered per-sample flags equal the one-process result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deq_attacks.distributed import gather_objects, rank_and_world


@dataclass(frozen=True)
class Shards:
    """This process's share of the work.

    Args:
        rank: this process's index (0..world-1).
        world: number of processes.
        block_size: samples per block (also the attack batch size).
    """

    rank: int = 0
    world: int = 1
    block_size: int = 100

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world - 1}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def current(cls, block_size: int) -> Shards:
        """The shards of the initialised process group (one process when there is none)."""
        rank, world = rank_and_world()
        return cls(rank, world, block_size)

    def blocks(self, n: int) -> list[slice]:
        """All blocks of ``n`` samples, in index order."""
        return [slice(s, min(s + self.block_size, n)) for s in range(0, n, self.block_size)]

    def mine(self, n: int) -> list[int]:
        """Indices of the blocks this process computes."""
        return list(range(self.rank, len(self.blocks(n)), self.world))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


BlockResult = dict[str, np.ndarray]
"""Per-sample arrays of one block, each with the block's samples on axis 0."""


def map_blocks(fn: Callable[[slice], BlockResult], n: int, shards: Shards) -> dict[str, np.ndarray]:
    """Run ``fn`` on this process's blocks of ``n`` samples, gather every block from every
    process, and concatenate each array in sample order (all processes get the whole)."""
    blocks = shards.blocks(n)
    local = {i: fn(blocks[i]) for i in shards.mine(n)}
    if shards.world > 1:
        local = {i: r for part in gather_objects(local) for i, r in part.items()}
    if not local:
        return {}
    missing = sorted(set(range(len(blocks))) - set(local))
    if missing:
        raise RuntimeError(f"blocks {missing} were computed by no process")
    keys = local[0].keys()
    return {k: np.concatenate([local[i][k] for i in range(len(blocks))]) for k in keys}

