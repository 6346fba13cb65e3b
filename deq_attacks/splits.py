"""Which images training and evaluation use: the one rule that splits a data spec into the
part training uses and the part it leaves out (held out), and the development and test splits
an evaluation chooses from a pool (ranges, index files, or the held-out default), validated
and recorded.

A data spec (``digits``, an arrays file ``FILE.npz``, ``cifar10:ROOT``) names a *pool* of
images that ranges and index files count in, and the part of it that training does not use
(the *held-out* part):

============================  ======================================  ======================
spec                          pool (indices count in it)              held out by default
============================  ======================================  ======================
``digits``                    the 1,797 embedded digits               ``1200:1797``
``FILE.npz`` with ``x_test``  its ``x_test``/``y_test``               all of it
``FILE.npz`` with ``x``       its ``x``/``y``                         its last 20%
``cifar10:ROOT``              the CIFAR-10 test set (10,000)          all of it
============================  ======================================  ======================

Training (``training_pool``) uses the first 1,200 digits, a file's ``x_train``, or the first
80% of a file without a test split; the default therefore never evaluates on training images.
Without ranges, the development split is the first ``n_dev`` held-out images and the test
split the next ``n_test``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deq_attacks.data import (
    ImageDataset,
    arrays_file_keys,
    load_arrays_file,
    load_cifar10,
    load_digits,
)

#: Images of the embedded digits that training uses (the first ones).
DIGITS_TRAIN_POOL = 1200
#: The fraction of a file without a test split that training uses (the first).
TRAIN_FRACTION = 0.8
#: Seed of training's (fixed) development split: it must not move with the training seed.
DEV_SPLIT_SEED = 20221128
#: Development and test images when neither a count nor indices are given.
DEFAULT_SPLIT_SIZE = 100


@dataclass(frozen=True, eq=False)
class EvaluationPool:
    """The images a data spec names.

    Attributes:
        data: every image that indices count in.
        held_out: the indices (ascending) that training does not use: the default source.
        note: one sentence on why ``held_out`` is what it is.
    """

    data: ImageDataset
    held_out: np.ndarray
    note: str

    def __len__(self) -> int:
        return len(self.data)


def evaluation_pool(spec: str) -> EvaluationPool:
    """The pool of ``digits``, an arrays file (``.npz``) or ``cifar10:ROOT``.

    Raises:
        FileNotFoundError: the spec is none of these.
    """
    if spec == "digits":
        data = load_digits()
        return EvaluationPool(
            data,
            np.arange(DIGITS_TRAIN_POOL, len(data)),
            f"deq-attacks train and the demo train on the first {DIGITS_TRAIN_POOL} digits",
        )
    if spec.startswith("cifar10:"):
        data = load_cifar10(spec.split(":", 1)[1], train=False)
        return EvaluationPool(data, np.arange(len(data)), "the CIFAR-10 test set")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"data {spec!r}: not 'digits', 'cifar10:ROOT' or an arrays file")
    if "x_test" in arrays_file_keys(path):
        data = load_arrays_file(path, split="test")
        return EvaluationPool(data, np.arange(len(data)), f"the test split of {path.name}")
    data = load_arrays_file(path)
    start = int(TRAIN_FRACTION * len(data))
    return EvaluationPool(
        data,
        np.arange(start, len(data)),
        f"{path.name} has no test split and deq-attacks train trains on its first "
        f"{TRAIN_FRACTION:.0%} (0:{start}), so the default is its last "
        f"{1 - TRAIN_FRACTION:.0%} ({start}:{len(data)})",
    )


def held_out_data(spec: str) -> ImageDataset:
    """The images of a data spec that training does not use (the pool's held-out part, in
    order): never the training split."""
    pool = evaluation_pool(spec)
    start = int(pool.held_out[0])  # the held-out part is always the pool's tail
    return pool.data if start == 0 else pool.data.split(start)[1]


def training_pool(spec: str) -> ImageDataset:
    """The images of ``digits`` or an arrays file that training uses (its training images and
    its development split are drawn from them): the first 1,200 digits, the file's
    ``x_train``/``y_train``, or the first 80% of a file without splits."""
    if spec == "digits":
        return load_digits().split(DIGITS_TRAIN_POOL)[0]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"data {spec!r}: not 'digits' or an arrays file")
    if "x_train" in arrays_file_keys(path):
        return load_arrays_file(path, split="train")
    everything = load_arrays_file(path)
    return everything.split(int(TRAIN_FRACTION * len(everything)))[0]


def training_split(n: int, dev_size: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) indices of a training pool of n images: the development split (checkpoint
    choice) is a fixed random subset of ``dev_size`` (seeded by ``DEV_SPLIT_SEED``, not by the
    training seed), train the rest (its first ``limit`` only, when given)."""
    if dev_size >= n:
        raise ValueError(
            f"dev_size={dev_size} is not below the {n} images of the training data: no "
            "training images would be left (lower dev_size)"
        )
    order = np.random.default_rng(DEV_SPLIT_SEED).permutation(n)
    dev, train = np.sort(order[:dev_size]), np.sort(order[dev_size:])
    if limit is not None:
        train = train[:limit]
    return train, dev


def describe_indices(indices: np.ndarray) -> str:
    """Indices as runs: ``[3, 4, 5, 9]`` -> ``"3:6,9"`` (Python slice ends, exclusive)."""
    parts: list[str] = []
    idx = [int(i) for i in indices]
    start = 0
    for pos in range(1, len(idx) + 1):
        if pos == len(idx) or idx[pos] != idx[pos - 1] + 1:
            first, last = idx[start], idx[pos - 1]
            parts.append(str(first) if first == last else f"{first}:{last + 1}")
            start = pos
    return ",".join(parts)


def check_indices(indices: np.ndarray, size: int, what: str) -> np.ndarray:
    """``indices`` as int64 (k,), k >= 1, each in [0, size), no duplicates; else ValueError."""
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"{what}: expected one index per image, got shape {idx.shape}")
    if idx.size == 0:
        raise ValueError(f"{what}: no indices")
    if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what}: indices must be integers, got {idx.dtype}")
    bad = idx[(idx < 0) | (idx >= size)]
    if bad.size:
        raise ValueError(
            f"{what}: index {int(bad[0])} is outside the {size} images of the data "
            f"(valid: 0..{size - 1}; {bad.size} out of range)"
        )
    values, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise ValueError(f"{what}: index {int(dup[0])} appears {int(counts.max())} times")
    return idx.astype(np.int64)


def parse_range(text: str, size: int, what: str) -> np.ndarray:
    """``"START:STOP"`` (STOP exclusive; ``"START:"`` runs to the end) as checked indices."""
    start_text, sep, stop_text = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        start = int(start_text)
        stop = int(stop_text) if stop_text.strip() else size
    except ValueError:
        raise ValueError(f"{what}: expected START:STOP (e.g. 9800:10000), got {text!r}") from None
    if start < 0 or stop <= start:
        raise ValueError(f"{what}: {text!r} is empty or negative (need 0 <= START < STOP)")
    if stop > size:
        raise ValueError(f"{what}: {text!r} reaches past the {size} images of the data")
    return check_indices(np.arange(start, stop), size, what)


def read_indices(path: str | Path, size: int, what: str) -> np.ndarray:
    """Indices from a ``.npy`` file (1-D integers) or a text file (one per line; blank lines
    and lines starting with ``#`` ignored), checked against ``size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no index file at {path}")
    if path.suffix == ".npy":
        try:
            idx = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{what}: {path} is not a numeric .npy array ({error})") from None
        return check_indices(idx, size, f"{what} {path}")
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(
                f"{what}: {path} line {number} is not an integer index: {item!r}"
            ) from None
    return check_indices(np.asarray(values, dtype=np.int64), size, f"{what} {path}")


@dataclass(frozen=True, eq=False)
class EvaluationSplit:
    """The development and test indices into ``pool`` (disjoint, checked) and their images."""

    pool: EvaluationPool
    dev_indices: np.ndarray
    test_indices: np.ndarray
    defaulted: tuple[str, ...] = ()

    def _subset(self, indices: np.ndarray) -> ImageDataset:
        return self.pool.data.subset(
            indices, name=f"{self.pool.data.name}[{describe_indices(indices)}]"
        )

    @property
    def dev(self) -> ImageDataset:
        return self._subset(self.dev_indices)

    @property
    def test(self) -> ImageDataset:
        return self._subset(self.test_indices)

    def outside_held_out(self) -> dict[str, int]:
        """How many development / test images lie outside the pool's held-out part."""
        held = self.pool.held_out
        return {
            "development": int((~np.isin(self.dev_indices, held)).sum()),
            "test": int((~np.isin(self.test_indices, held)).sum()),
        }

    def record(self) -> dict[str, Any]:
        """The split as plain JSON values (for the results' description)."""
        return {
            "pool": self.pool.data.name,
            "pool_size": len(self.pool),
            "held_out": describe_indices(self.pool.held_out),
            "development": describe_indices(self.dev_indices),
            "test": describe_indices(self.test_indices),
            "defaulted": list(self.defaulted),
            "outside_held_out": self.outside_held_out(),
            "note": self.pool.note,
        }

    def summary(self) -> str:
        """What is used, in a few lines (the CLI prints it)."""
        lines = [
            f"data {self.pool.data.name} ({len(self.pool)} images): development "
            f"{describe_indices(self.dev_indices)} ({len(self.dev_indices)} images), test "
            f"{describe_indices(self.test_indices)} ({len(self.test_indices)} images)"
        ]
        if self.defaulted:
            lines.append(
                f"  {' and '.join(self.defaulted)} from the held-out part "
                f"{describe_indices(self.pool.held_out)}: {self.pool.note}"
            )
        for name, count in self.outside_held_out().items():
            if count:
                lines.append(
                    f"  note: {count} {name} images lie outside the held-out part "
                    f"{describe_indices(self.pool.held_out)}: make sure the model was not "
                    "trained on them"
                )
        return "\n".join(lines)


def _count(value: int | None, split: str, name: str) -> int:
    if value is None:
        return DEFAULT_SPLIT_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: the number of {split} images must be at least 1, got {value!r}")
    return value


def choose_split(
    pool: EvaluationPool,
    *,
    dev: np.ndarray | None = None,
    test: np.ndarray | None = None,
    n_dev: int | None = None,
    n_test: int | None = None,
    names: Sequence[str] = ("the development split", "the test split"),
) -> EvaluationSplit:
    """Development and test indices: the ones given (checked), the others the first held-out
    images not already taken (``n_dev``/``n_test`` of them, default 100 each).

    ``names`` say how the two are called in errors (e.g. the command-line options).

    Raises:
        ValueError: indices out of range or duplicated, dev and test overlapping, a count
            with indices for the same split, or too few held-out images for the counts.
    """
    dev_name, test_name = names
    if dev is not None and n_dev is not None:
        raise ValueError(f"give {dev_name} as indices or as a count, not both")
    if test is not None and n_test is not None:
        raise ValueError(f"give {test_name} as indices or as a count, not both")
    size = len(pool)
    if dev is not None:
        dev = check_indices(dev, size, dev_name)
    if test is not None:
        test = check_indices(test, size, test_name)
    if dev is not None and test is not None:
        shared = np.intersect1d(dev, test)
        if shared.size:
            raise ValueError(
                f"{dev_name} and {test_name} share {shared.size} images "
                f"({describe_indices(shared[:20])}{' ...' if shared.size > 20 else ''}): "
                "they must be disjoint"
            )
    taken = np.concatenate([i for i in (dev, test) if i is not None] or [np.zeros(0, np.int64)])
    free = pool.held_out[~np.isin(pool.held_out, taken)]
    defaulted = []
    if dev is None:
        count = _count(n_dev, "development", dev_name)
        dev, free = free[:count], free[count:]
        defaulted.append(f"development ({count})")
        if len(dev) < count:
            raise ValueError(_too_few(pool, count, len(dev), "development", dev_name))
    if test is None:
        count = _count(n_test, "test", test_name)
        if len(free) < count:
            raise ValueError(_too_few(pool, count, len(free), "test", test_name))
        test = free[:count]
        defaulted.append(f"test ({count})")
    return EvaluationSplit(pool, dev, test, tuple(defaulted))


def _too_few(pool: EvaluationPool, want: int, have: int, split: str, name: str) -> str:
    return (
        f"{want} {split} images asked, but only {have} held-out images are left "
        f"({len(pool.held_out)} held out in all: {pool.note}); ask for fewer, or choose "
        f"{name} explicitly"
    )
