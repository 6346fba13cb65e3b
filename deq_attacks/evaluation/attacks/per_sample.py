"""pyautoattack's APGD, APGD-T and Square with their random draws made per sample.

pyautoattack 0.2.0 (the original code of Croce & Hein) draws its randomness from torch's global
generator for the whole batch, so a sample's result depends on the batch it is attacked in.
These subclasses change nothing in the algorithms, only where the draws come from:

- APGD and APGD-T (L-inf and L2): the random start of ``attack_single_run(x, y, x_init)`` is
  drawn per sample, from the sample's own generator (``SampleSeeds.torch_generators``;
  L-inf uniform, L2 Gaussian, as pyautoattack draws them), and passed as ``x_init``
  (APGD-T's restarts per target class draw the next numbers of the same generator). APGD
  draws nothing else.
- Square (L-inf): the initial vertical stripes are drawn per sample. Its per-iteration draws
  (the square's position and its signs) are shared by the batch and their number per
  iteration does not depend on the batch, so with torch's generator seeded by the column's
  shared seed at each ``perturb`` they are the same for every batch.
- Square (L2): its per-iteration signs are drawn for the rows still unbroken (a batch-sized
  draw), so each sample is attacked in its own ``perturb`` with torch's generator seeded by
  the sample's own seed (slower: one sample's queries at a time).
- FAB-T of the standard version runs one restart without a random start
  (``use_rand_start=(counter > 0)``): nothing to change.

The rows of the sub-batches that pyautoattack passes to ``attack_single_run`` are matched to the
block's samples: the first sub-batch (the correctly classified samples, in order) by content,
each later one by following pyautoattack's own bookkeeping (the rows still robust after the
previous run), checked against the content each time.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.square import SquareAttack
from torch import Tensor

from deq_attacks.adversarial.seeds import SampleSeeds


class RowTracker:
    """Which sample of the block each row of pyautoattack's sub-batches is, in one ``perturb``.

    Args:
        x, y: the block given to ``perturb`` (B, ...) and its labels (B,).
        seeds: the block's per-sample seeds; stream: the attack's stream name.
    """

    def __init__(self, x: Tensor, y: Tensor, seeds: SampleSeeds, stream: str) -> None:
        if len(seeds) != len(x) or len(y) != len(x):
            raise ValueError(f"{len(seeds)} seeds and {len(y)} labels for {len(x)} samples")
        self.x, self.y = x.detach(), y.detach()
        self.generators = seeds.torch_generators(stream)
        self._next: np.ndarray | None = None

    def rows(self, x_sub: Tensor, y_sub: Tensor) -> np.ndarray:
        """The block rows (m,) of a sub-batch (m, ...), checked by content."""
        rows = self._match(x_sub, y_sub) if self._next is None else self._next
        index = torch.as_tensor(rows, device=self.x.device)
        if len(rows) != len(x_sub) or not (
            torch.equal(self.x[index], x_sub.detach()) and torch.equal(self.y[index], y_sub)
        ):
            raise RuntimeError(
                "pyautoattack attacked rows that are not the ones still robust: the per-sample "
                "seeds cannot be matched (is pyautoattack 0.2.0 installed?)"
            )
        return rows

    def robust(self, rows: np.ndarray, still_robust: Tensor) -> None:
        """After a run on ``rows``: the next sub-batch is the rows it left robust."""
        self._next = rows[still_robust.detach().cpu().numpy().astype(bool)]

    def uniform(self, rows: np.ndarray, shape: tuple[int, ...], device: Any) -> Tensor:
        """U[0, 1) draws of ``shape`` per row, from each sample's generator, stacked (m, ...)."""
        draws = [torch.rand(shape, generator=self.generators[row]) for row in rows]
        return torch.stack(draws).to(device)

    def normal(self, rows: np.ndarray, shape: tuple[int, ...], device: Any) -> Tensor:
        """N(0, 1) draws of ``shape`` per row, from each sample's generator, stacked (m, ...)."""
        draws = [torch.randn(shape, generator=self.generators[row]) for row in rows]
        return torch.stack(draws).to(device)

    def _match(self, x_sub: Tensor, y_sub: Tensor) -> np.ndarray:
        """Rows of the block equal to the sub-batch's, in increasing order (a sub-batch is
        ``x[sorted indices]``; equal samples with equal labels are both in it or both out)."""
        keys: dict[bytes, list[int]] = {}
        for row, key in enumerate(_row_keys(self.x, self.y)):
            keys.setdefault(key, []).append(row)
        rows, last = [], -1
        for key in _row_keys(x_sub, y_sub):
            candidates = keys.get(key, [])
            at = bisect.bisect_right(candidates, last)
            if at == len(candidates):
                raise RuntimeError("a sub-batch row is not a row of the block")
            last = candidates[at]
            rows.append(last)
        return np.asarray(rows, dtype=np.int64)


def _row_keys(x: Tensor, y: Tensor) -> list[bytes]:
    flat = x.detach().reshape(len(x), -1).cpu().numpy()
    labels = y.detach().cpu().numpy()
    return [flat[i].tobytes() + labels[i].tobytes() for i in range(len(x))]


class _Seeded:
    """The per-sample state of one ``perturb`` call (``run`` sets it, then clears it)."""

    tracker: RowTracker | None = None

    @contextmanager
    def seeded(self, x: Tensor, y: Tensor, seeds: SampleSeeds, stream: str) -> Iterator[None]:
        self.tracker = RowTracker(x.float(), y, seeds, stream)
        try:
            yield
        finally:
            self.tracker = None

    def _tracker(self) -> RowTracker:
        if self.tracker is None:
            raise RuntimeError(f"{type(self).__name__} runs through run(x, y, seeds)")
        return self.tracker


def _start(attack: APGDAttack, tracker: RowTracker, x: Tensor, y: Tensor) -> tuple:
    """APGD's random start per sample, x + eps * normalize(t) with t = 2 U - 1 (L-inf) or
    t ~ N(0, I) (L2); then its run."""
    rows = tracker.rows(x, y)
    shape = tuple(x.shape[1:])
    if attack.norm == "Linf":
        t = 2 * tracker.uniform(rows, shape, x.device) - 1
    else:
        t = tracker.normal(rows, shape, x.device)
    x_init = x + attack.eps * attack.normalize(t)
    result = APGDAttack.attack_single_run(attack, x, y, x_init=x_init)
    tracker.robust(rows, result[1])
    return result


class PerSampleAPGD(_Seeded, APGDAttack):
    """pyautoattack's APGD (L-inf or L2) with each sample's random start from its own generator."""

    stream = "apgd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.norm not in ("Linf", "L2"):
            raise ValueError(f"per-sample APGD is L-inf or L2, got {self.norm}")

    def run(self, x: Tensor, y: Tensor, seeds: SampleSeeds) -> Tensor:
        """``perturb(x, y)`` with the per-sample random starts of ``seeds``."""
        with self.seeded(x, y, seeds, f"{self.stream}-{self.loss}"):
            return self.perturb(x, y)

    def attack_single_run(self, x: Tensor, y: Tensor, x_init: Tensor | None = None) -> tuple:
        if x_init is not None:
            raise ValueError("per-sample APGD draws its own start (x_init is for L1)")
        return _start(self, self._tracker(), x, y)


class PerSampleAPGDTargeted(_Seeded, APGDAttack_targeted):
    """pyautoattack's APGD-T (L-inf or L2) with each sample's random starts (one per target class
    and restart) from its own generator."""

    stream = "apgd-t"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.norm not in ("Linf", "L2"):
            raise ValueError(f"per-sample APGD-T is L-inf or L2, got {self.norm}")

    def run(self, x: Tensor, y: Tensor, seeds: SampleSeeds) -> Tensor:
        """``perturb(x, y)`` with the per-sample random starts of ``seeds``."""
        with self.seeded(x, y, seeds, self.stream):
            return self.perturb(x, y)

    def attack_single_run(self, x: Tensor, y: Tensor, x_init: Tensor | None = None) -> tuple:
        if x_init is not None:
            raise ValueError("per-sample APGD-T draws its own start (x_init is for L1)")
        return _start(self, self._tracker(), x, y)


class PerSampleSquare(_Seeded, SquareAttack):
    """pyautoattack's Square with one restart. L-inf: each sample's initial stripes from its
    own generator and the per-iteration draws from torch's generator seeded by the column's
    shared seed. L2: each sample attacked alone, torch's generator seeded by its own seed."""

    stream = "square"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.norm not in ("Linf", "L2") or self.n_restarts != 1:
            raise ValueError(
                f"per-sample Square is L-inf or L2 with one restart, got {self.norm}, "
                f"{self.n_restarts} restarts"
            )
        self._initial_rows: np.ndarray | None = None

    def run(self, x: Tensor, y: Tensor, seeds: SampleSeeds) -> Tensor:
        """``perturb(x, y)`` with the per-sample draws of ``seeds``."""
        if self.norm == "L2":
            rows = []
            for j in range(len(x)):
                self.seed = seeds.numpy_seed(j, self.stream)
                rows.append(self.perturb(x[j : j + 1], y[j : j + 1]))
            return torch.cat(rows) if rows else x.clone()
        self.seed = seeds.shared_seed(self.stream)
        with self.seeded(x, y, seeds, self.stream):
            return self.perturb(x, y)

    def attack_single_run(self, x: Tensor, y: Tensor) -> tuple:
        if self.norm == "L2":
            return super().attack_single_run(x, y)
        self._initial_rows = self._tracker().rows(x, y)
        try:
            return super().attack_single_run(x, y)
        finally:
            self._initial_rows = None

    def random_choice(self, shape: Any) -> Tensor:
        """Square's +-1 draws; the first of a run (the initial stripes (m, c, 1, w)) per
        sample."""
        rows = self._initial_rows
        if rows is None:
            return super().random_choice(shape)
        self._initial_rows = None
        if len(shape) != 4 or shape[0] != len(rows):
            raise RuntimeError(f"Square's first draw is its stripes (m, c, 1, w), got {shape}")
        t = 2 * self._tracker().uniform(rows, tuple(shape[1:]), self.device) - 1
        return torch.sign(t)
