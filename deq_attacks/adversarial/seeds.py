"""Per-sample randomness: a sample's draws depend on the run's seed, the column and the sample's
index only, never on its batch, its shard or which other samples were dropped.

So a column's per-sample result is the same whether the sample is attacked with all the others
(table mode), with the few still robust (cascade mode), or alone; and the cascade and the full
matrix give the same per-sample verdict (tested on a batch-invariant DEQ).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch


def _key(text: str) -> int:
    """A stable 32-bit number for a name (CRC-32: the same in every process and run)."""
    return zlib.crc32(text.encode())


def named_rng(seed: int, name: str) -> np.random.Generator:
    """numpy's generator of the stream ``name`` of the run's ``seed`` (the same in every
    process and run; another name, an independent stream)."""
    return np.random.default_rng([seed, _key(name)])


@dataclass(frozen=True)
class SampleSeeds:
    """The seeds of one column on a block of samples.

    Args:
        seed: the run's seed (``EvaluationConfig.seed``), >= 0.
        column: the column's label (streams of different columns are independent).
        indices: the global index of each sample of the block (B,), in the block's order.
    """

    seed: int
    column: str
    indices: np.ndarray

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        indices = np.asarray(self.indices)
        if indices.ndim != 1 or (indices.size and indices.min() < 0):
            raise ValueError(f"indices must be non-negative sample indices (B,), got {indices!r}")
        object.__setattr__(self, "indices", indices.astype(np.int64))

    @classmethod
    def first(cls, seed: int, column: str, size: int, first_index: int = 0) -> SampleSeeds:
        """Seeds of ``size`` consecutive samples from ``first_index`` on."""
        return cls(seed, column, np.arange(first_index, first_index + size))

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, rows: np.ndarray | torch.Tensor) -> SampleSeeds:
        """The seeds of some rows of this block, in the given order."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        return SampleSeeds(self.seed, self.column, self.indices[np.asarray(rows, dtype=np.int64)])

    def start(self, row: int) -> np.random.Generator:
        """The generator of the fixed-step PGD's uniform start of ``row``: (seed, index), the
        same for every column, so PGD columns differ by their gradient only."""
        return np.random.default_rng([self.seed, int(self.indices[row])])

    def _entropy(self, stream: str, row: int | None) -> list[int]:
        sample = [] if row is None else [int(self.indices[row])]
        return [self.seed, *sample, _key(self.column), _key(stream)]

    def sample_seed(self, row: int, stream: str) -> int:
        """A 63-bit seed of ``row`` for the named stream of this column (torch.manual_seed)."""
        words = np.random.SeedSequence(self._entropy(stream, row)).generate_state(2, np.uint32)
        return int(words[0]) << 31 ^ int(words[1])

    def numpy_seed(self, row: int, stream: str) -> int:
        """A 32-bit seed of ``row`` for the named stream (numpy's global ``np.random.seed``)."""
        return int(np.random.SeedSequence(self._entropy(stream, row)).generate_state(1)[0])

    def shared_seed(self, stream: str) -> int:
        """A seed of the named stream shared by every sample of this column (draws that an
        attack makes once per iteration for the whole batch)."""
        words = np.random.SeedSequence(self._entropy(stream, None)).generate_state(2, np.uint32)
        return int(words[0]) << 31 ^ int(words[1])

    def torch_generators(self, stream: str) -> list[torch.Generator]:
        """One CPU generator per row, seeded by ``sample_seed`` (draws stay on the CPU, as
        pyautoattack's do, so they do not depend on the device)."""
        return [
            torch.Generator(device="cpu").manual_seed(self.sample_seed(row, stream))
            for row in range(len(self))
        ]
