"""Typed records of one protocol run: what scoring a set of inputs against the defenses finds
(``Scores``), the early-exit step's result (``Development``) and the sweep's
(``SweepResult``). ``Scores`` keeps the result store's flat form (the only place that names
its keys: ``"index"``, ``"defense/<name>"``, ``"finite/<name>"``, ``"margin/<name>"``,
``"states"``, ``"residuals"`` and an attack's extras), so stores written before these records
resume."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deq_attacks.gradients import GradientEstimate

_SCORED = ("index", "states", "residuals")


@dataclass
class Scores:
    """Per-sample results of S samples, in one order.

    Attributes:
        correct: defense -> bool (S,): its logits are finite and predict the label.
        finite: defense -> bool (S,): its logits are all finite.
        states: bool (S, N): ``z_n`` classifies the sample correctly (n = 1..N); None for a
            run that scored the defenses only (a per-defense column).
        residuals: float (S, N): relative residual of ``z_n``; None with ``states``.
        index: int (S,): the samples' indices in their split (None: 0..S-1 of the inputs).
        extras: run (the store key of one attack run) -> the attack's per-sample extras
            (S,) (AutoAttack's per-attack results).
        margins: defense -> float (S,): the label's logit minus the largest other
            (``scoring.margin``; only where asked for: the racing sweep's tie-break).
    """

    correct: dict[str, np.ndarray]
    finite: dict[str, np.ndarray] = field(default_factory=dict)
    states: np.ndarray | None = None
    residuals: np.ndarray | None = None
    index: np.ndarray | None = None
    extras: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    margins: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        """S, the number of samples scored."""
        return len(next(iter(self.correct.values()), ()))

    def accuracy(self, defense: str) -> float:
        """The fraction of samples ``defense`` classifies correctly."""
        return float(np.mean(self.correct[defense]))

    def per_state(self) -> np.ndarray:
        """Accuracy of every iterate (N,) (a run that scored the states)."""
        if self.states is None:
            raise ValueError("these scores hold no per-iterate results")
        return np.asarray(self.states, dtype=bool).mean(axis=0)

    def arrays(self, run: str | None = None) -> dict[str, np.ndarray]:
        """The store's flat form of these scores (with the extras of ``run``)."""
        out: dict[str, np.ndarray] = {} if self.index is None else {"index": self.index}
        out.update({f"defense/{d}": v for d, v in self.correct.items()})
        out.update({f"finite/{d}": v for d, v in self.finite.items()})
        out.update({f"margin/{d}": v for d, v in self.margins.items()})
        if self.states is not None and self.residuals is not None:
            out["states"], out["residuals"] = self.states, self.residuals
        out.update(self.extras.get(run, {}) if run is not None else {})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], run: str | None = None) -> Scores:
        """Scores from the store's flat form (lists or arrays); anything that is not a score
        is an extra of ``run``."""
        values = {k: np.asarray(v) for k, v in arrays.items()}
        extras = {
            k: v for k, v in values.items()
            if k not in _SCORED and not k.startswith(("defense/", "finite/", "margin/"))
        }  # fmt: skip
        if extras and run is None:
            raise ValueError(f"per-sample extras {sorted(extras)} need the run they belong to")
        return cls(
            correct={k[8:]: v.astype(bool) for k, v in values.items() if k.startswith("defense/")},
            finite={k[7:]: v.astype(bool) for k, v in values.items() if k.startswith("finite/")},
            states=values.get("states"),
            residuals=values.get("residuals"),
            index=values.get("index"),
            extras={run: extras} if extras and run is not None else {},
            margins={k[7:]: v for k, v in values.items() if k.startswith("margin/")},
        )

    def extended(self, other: Scores) -> Scores:
        """These scores followed by ``other``'s: more samples with the same fields."""

        def joined(mine: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> dict:
            return {k: np.concatenate([mine[k], v]) for k, v in theirs.items()}

        def stacked(mine: np.ndarray | None, theirs: np.ndarray | None) -> np.ndarray | None:
            return None if mine is None or theirs is None else np.concatenate([mine, theirs])

        return Scores(
            joined(self.correct, other.correct),
            joined(self.finite, other.finite),
            stacked(self.states, other.states),
            stacked(self.residuals, other.residuals),
            stacked(self.index, other.index),
            {run: joined(self.extras[run], e) for run, e in other.extras.items()},
            joined(self.margins, other.margins),
        )

    def merge(self, other: Scores) -> Scores:
        """These scores and ``other``'s (the same samples; another defense's run) together."""
        mine, theirs = self.index, other.index
        if mine is not None and theirs is not None and not np.array_equal(mine, theirs):
            raise ValueError("merged scores must hold the same samples")
        return Scores(
            {**self.correct, **other.correct},
            {**self.finite, **other.finite},
            self.states if self.states is not None else other.states,
            self.residuals if self.residuals is not None else other.residuals,
            self.index if self.index is not None else other.index,
            {**self.extras, **other.extras},
            {**self.margins, **other.margins},
        )


@dataclass(frozen=True)
class Development:
    """The early-exit step's result on the development split (stored as its fields).

    Attributes:
        early_exit: n*, the iterate most robust under the ready-made PGD (1-based).
        early_exit_tied: the iterates tied with it.
        early_exit_clean_gap: how far n*'s clean accuracy is below the last iterate's.
        pgd_accuracy_per_state, clean_accuracy_per_state, residual_per_state: per iterate
            (N,): the ready-made PGD's and the clean accuracy, the mean relative residual.
        pgd_accuracy: defense ("final", "ensemble") -> the ready-made PGD's accuracy.
    """

    early_exit: int
    early_exit_tied: list[int]
    early_exit_clean_gap: float
    pgd_accuracy_per_state: list[float]
    clean_accuracy_per_state: list[float]
    residual_per_state: list[float]
    pgd_accuracy: dict[str, float]

    @property
    def early_pgd_accuracy(self) -> float:
        """The ready-made PGD's accuracy of the early exit z_{n*}."""
        return float(self.pgd_accuracy_per_state[self.early_exit - 1])


@dataclass(frozen=True)
class SweepResult:
    """What the sweep of intermediate attacks found on the development split.

    Attributes:
        chosen: family -> its chosen estimate (a family that did not run is absent).
        entries: one entry per candidate that ran (Fig. 3/4 data: accuracies per defense
            and iterate, images seen, the race's rounds).
        plan: per family, whether and how it runs over the model's solver.
    """

    chosen: dict[str, GradientEstimate]
    entries: list[dict[str, Any]]
    plan: list[dict[str, Any]]
