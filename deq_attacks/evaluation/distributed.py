"""Sharding an evaluation across processes (``torchrun``): blocks of samples by index.

The samples (all of them, or the ones a cascade still attacks) are cut into blocks of
``block_size`` in order; rank r takes blocks r, r+K, ... Every attack runs on one block at a
time and draws its randomness per sample, from the sample's global index, so a block's results
do not depend on which process ran it or on what else that process ran: the gathered
per-sample flags equal the one-process result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
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

    def cut(self, indices: np.ndarray) -> list[np.ndarray]:
        """``indices`` cut into consecutive blocks of ``block_size``, in order."""
        return [indices[s : s + self.block_size] for s in range(0, len(indices), self.block_size)]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


BlockResult = dict[str, np.ndarray]
"""Per-sample arrays of one block, each with the block's samples on axis 0."""


class BlockMap:
    """The blocks of ``samples`` (a count n: the indices 0..n-1; or an index array, cut in
    order) and this process's share of them: iterate ``mine()``, give each block's result to
    ``finish``; every round (block numbers r*K .. r*K+K-1 of the blocks still to do) is
    gathered from every process before the next, and ``result()`` concatenates each array in
    the order of the samples (all processes get the whole; an empty selection gives {}).

    Args:
        done: results of blocks finished earlier, by block number (not recomputed).
        on_block: called on every process with each newly finished block, as soon as its
            round is gathered (the result store records each block this way).
    """

    def __init__(
        self,
        samples: int | np.ndarray,
        shards: Shards,
        *,
        done: Mapping[int, BlockResult] | None = None,
        on_block: Callable[[int, BlockResult], None] | None = None,
    ) -> None:
        indices = np.arange(samples) if isinstance(samples, int) else np.asarray(samples, np.int64)
        self.blocks = shards.cut(indices)
        self.shards = shards
        self.results: dict[int, BlockResult] = dict(done or {})
        self.on_block = on_block
        self._local: dict[int, BlockResult] = {}

    def mine(self) -> Iterator[tuple[int, np.ndarray]]:
        """(block number, sample indices) of each block this process computes, round by
        round; the round is gathered after the caller's ``finish``."""
        shards = self.shards
        todo = [i for i in range(len(self.blocks)) if i not in self.results]
        for start in range(0, len(todo), shards.world):
            round_ = todo[start : start + shards.world]
            self._local = {}
            if shards.rank < len(round_):
                number = round_[shards.rank]
                yield number, self.blocks[number]
            local = self._local
            if shards.world > 1:
                local = {i: r for part in gather_objects(local) for i, r in part.items()}
            for number in sorted(local):
                self.results[number] = local[number]
                if self.on_block is not None:
                    self.on_block(number, local[number])

    def finish(self, number: int, result: BlockResult) -> None:
        """The result of block ``number`` (per-sample arrays, the block's samples on axis 0)."""
        self._local[number] = result

    def result(self) -> dict[str, np.ndarray]:
        """Every block's arrays concatenated in the order of the samples."""
        if not self.blocks:
            return {}
        missing = sorted(set(range(len(self.blocks))) - set(self.results))
        if missing:
            raise RuntimeError(f"blocks {missing} were computed by no process")
        keys = self.results[0].keys()
        return {
            k: np.concatenate([np.asarray(self.results[i][k]) for i in range(len(self.blocks))])
            for k in keys
        }


def map_blocks(
    fn: Callable[[np.ndarray], BlockResult],
    samples: int | np.ndarray,
    shards: Shards,
    *,
    done: Mapping[int, BlockResult] | None = None,
    on_block: Callable[[int, BlockResult], None] | None = None,
) -> dict[str, np.ndarray]:
    """``fn(indices)`` on the blocks of ``samples``, this process's share of them, gathered and
    concatenated in the order of the samples (``BlockMap``; ``done`` and ``on_block`` as
    there)."""
    blocks = BlockMap(samples, shards, done=done, on_block=on_block)
    for number, part in blocks.mine():
        blocks.finish(number, fn(part))
    return blocks.result()
