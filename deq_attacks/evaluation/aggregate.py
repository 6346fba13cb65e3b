"""The per-sample result matrix and its two aggregations (Sec. 6.2-6.3), with Wilson intervals.

``survived[d, c, i]`` says whether test sample i is classified correctly by defense d both
clean and under the attack of column c. The paper's white-box robustness is
``max_d min_c mean_i survived[d, c, i]``; the AutoAttack-style one counts a sample for defense
d only if it survives every column: ``max_d mean_i min_c survived[d, c, i]``. The second never
exceeds the first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (default 95%) of a binomial proportion successes / n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson_upper(failures: int, n: int, confidence: float = 0.95) -> float:
    """The one-sided Clopper-Pearson upper bound of a binomial proportion after ``failures``
    in ``n`` trials: the p at which P(X <= failures; n, p) = 1 - confidence (the beta
    quantile; with zero failures 1 - (1 - confidence)^(1/n)), by bisection on the binomial
    distribution function; 1 when failures = n, 0 when n = 0 trials were needed."""
    if n < 0 or not 0 <= failures <= n:
        raise ValueError(f"need 0 <= failures <= n, got {failures} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0
    if failures == n:
        return 1.0
    alpha = 1 - confidence
    if failures == 0:
        return 1 - alpha ** (1 / n)

    def cdf(p: float) -> float:
        return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(failures + 1))

    low, high = failures / n, 1.0
    for _ in range(100):  # cdf falls with p: bisect to float precision
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) > alpha else (low, middle)
    return high


@dataclass(frozen=True)
class Robustness:
    """A robust accuracy with its 95% Wilson interval and the defense it belongs to."""

    defense: str
    accuracy: float
    low: float
    high: float
    robust: int
    n: int

    def __str__(self) -> str:
        return f"{100 * self.accuracy:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


@dataclass
class SurvivalMatrix:
    """Per-sample survival of each defense under each attack column.

    Attributes:
        defenses: row names (D).
        columns: attack column labels (C).
        survived: bool (D, C, S): clean-correct and correct under that column's attack.
        clean: bool (D, S): clean-correct.
    """

    defenses: list[str]
    columns: list[str]
    survived: np.ndarray
    clean: np.ndarray

    def __post_init__(self) -> None:
        d, c = len(self.defenses), len(self.columns)
        if self.survived.ndim != 3 or self.survived.shape[:2] != (d, c):
            raise ValueError(f"survived must be (D={d}, C={c}, S), got {self.survived.shape}")
        if self.clean.shape != (d, self.survived.shape[2]):
            raise ValueError(f"clean must be (D, S), got {self.clean.shape}")
        if c == 0 or self.survived.shape[2] == 0:
            raise ValueError("the matrix needs at least one column and one sample")
        self.survived = self.survived.astype(bool) & self.clean.astype(bool)[:, None, :]

    @property
    def n_samples(self) -> int:
        return int(self.survived.shape[2])

    def column_accuracy(self) -> np.ndarray:
        """(D, C) mean accuracy of each cell."""
        return self.survived.mean(axis=2)

    def _robustness(self, defense: int, robust: int) -> Robustness:
        low, high = wilson_interval(robust, self.n_samples)
        return Robustness(
            self.defenses[defense], robust / self.n_samples, low, high, robust, self.n_samples
        )

    def paper_worst(self) -> list[Robustness]:
        """Per defense: the column with the lowest mean accuracy (the paper's aggregation)."""
        counts = self.survived.sum(axis=2)  # (D, C)
        return [self._robustness(d, int(counts[d].min())) for d in range(len(self.defenses))]

    def per_sample_worst(self) -> list[Robustness]:
        """Per defense: samples that survive every column (AutoAttack-style aggregation)."""
        counts = self.survived.all(axis=1).sum(axis=1)  # (D,)
        return [self._robustness(d, int(counts[d])) for d in range(len(self.defenses))]

    def paper_robustness(self) -> Robustness:
        """Max over defenses of the min over columns of mean accuracy."""
        return best_defense(self.paper_worst())

    def per_sample_robustness(self) -> Robustness:
        """Max over defenses of the fraction of samples that survive every column."""
        return best_defense(self.per_sample_worst())


def best_defense(per_defense: Sequence[Robustness]) -> Robustness:
    """The most robust defense (the first one on ties)."""
    return max(per_defense, key=lambda r: r.robust)


def tied_best(state_correct: np.ndarray) -> list[int]:
    """The iterates n (1-based) whose accuracy under the ready-made attack, ``state_correct``
    bool (S, N), is the best (more than one: a tie)."""
    if state_correct.ndim != 2 or state_correct.shape[1] == 0:
        raise ValueError(f"state_correct must be (samples, N), got {state_correct.shape}")
    accuracy = state_correct.mean(axis=0)
    return [int(n) + 1 for n in np.flatnonzero(accuracy == accuracy.max())]


def choose_early_exit(state_correct: np.ndarray, clean_accuracy: np.ndarray | None = None) -> int:
    """The early-exit step n* (1-based): the iterate with the best accuracy under the
    ready-made attack on the development split, ``state_correct`` bool (S, N). Ties go to the
    best clean accuracy ``clean_accuracy`` (N,) among the tied iterates, then to the latest
    (the state closest to the fixed point): never to a state that merely ties at a low
    accuracy while classifying worse."""
    tied = tied_best(state_correct)
    if clean_accuracy is None:
        return tied[-1]
    clean = np.asarray(clean_accuracy, dtype=float)
    if clean.shape != (state_correct.shape[1],):
        raise ValueError(f"clean_accuracy must be ({state_correct.shape[1]},), got {clean.shape}")
    return max(tied, key=lambda n: (clean[n - 1], n))


def choose_strongest(accuracies: Sequence[float]) -> int:
    """Index of the attack with the lowest accuracy (the largest drop); the first on ties."""
    if not accuracies:
        raise ValueError("no candidates to choose from")
    return int(np.argmin(np.asarray(accuracies)))
