"""The sweep for the strongest intermediate attack (Sec. 5.1, Fig. 3 and 4), on the
development split: ``Adjoint(n, beta)`` over n and beta, ``Unrolled(n, k, lam)`` over n, k and
lambda. Each candidate is one shared PGD run that scores every defense and every iterate; the
paper chooses, per family, the candidate with the largest drop of the early-state defense."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.aggregate import choose_strongest
from deq_attacks.evaluation.attacks import ThreatModel
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.shared_runs import shared_pgd_scores
from deq_attacks.gradients import Adjoint, GradientEstimate, Unrolled
from deq_attacks.interfaces import DEQEstimator


def _parse(text: str, kind: type, name: str) -> tuple[Any, ...] | None:
    """ "all" -> None; "1,2,5" -> (1, 2, 5) of ``kind``."""
    if text.strip().lower() == "all":
        return None
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"{name}: expected comma-separated {kind.__name__}s, got {text!r}"
        ) from None
    if not values:
        raise ValueError(f"{name}: no values in {text!r}")
    return values


@dataclass(frozen=True)
class SweepConfig:
    """The grid of intermediate attacks, each field "all" (n: 1..N) or comma-separated values.

    Args:
        adjoint_steps: n of ``Adjoint(n, beta)``.
        adjoint_betas: beta of ``Adjoint``.
        unrolled_steps: n of ``Unrolled(n, k, lam)``.
        unrolled_ks: k of ``Unrolled``.
        unrolled_lams: lambda of ``Unrolled``.
    """

    adjoint_steps: str = field(default="all", metadata={"help": "Adjoint n: 'all' or '1,2,4'"})
    adjoint_betas: str = field(default="0.5,1.0", metadata={"help": "Adjoint beta values"})
    unrolled_steps: str = field(default="all", metadata={"help": "Unrolled n: 'all' or list"})
    unrolled_ks: str = field(default="1,2,5", metadata={"help": "Unrolled k values"})
    unrolled_lams: str = field(default="0.5,1.0", metadata={"help": "Unrolled lambda values"})

    def __post_init__(self) -> None:
        for name in ("adjoint_steps", "unrolled_steps", "unrolled_ks"):
            values = _parse(getattr(self, name), int, name)
            if name == "unrolled_ks" and values is None:
                raise ValueError("unrolled_ks must list values (k is unbounded)")
            if values is not None and min(values) < 1:
                raise ValueError(f"{name}: values must be >= 1, got {values}")
        for name in ("adjoint_betas", "unrolled_lams"):
            values = _parse(getattr(self, name), float, name)
            if values is None or not all(0 < v <= 1 for v in values):
                raise ValueError(f"{name}: list values in (0, 1], got {getattr(self, name)!r}")

    def _steps(self, text: str, threshold: int, name: str) -> tuple[int, ...]:
        values = _parse(text, int, name)
        if values is None:
            return tuple(range(1, threshold + 1))
        if max(values) > threshold:
            raise ValueError(f"{name}: n={max(values)} is beyond the solver's {threshold} iterates")
        return values

    def candidates(self, threshold: int) -> dict[str, list[GradientEstimate]]:
        """The candidates of each family, for a solver with ``threshold`` iterates."""
        betas = _parse(self.adjoint_betas, float, "adjoint_betas") or ()
        ks = _parse(self.unrolled_ks, int, "unrolled_ks") or ()
        lams = _parse(self.unrolled_lams, float, "unrolled_lams") or ()
        adjoint: list[GradientEstimate] = [
            Adjoint(n=n, beta=b)
            for n in self._steps(self.adjoint_steps, threshold, "adjoint_steps")
            for b in betas
        ]
        unrolled: list[GradientEstimate] = [
            Unrolled(n=n, k=k, lam=lam)
            for n in self._steps(self.unrolled_steps, threshold, "unrolled_steps")
            for k in ks
            for lam in lams
        ]
        return {"adjoint": adjoint, "unrolled": unrolled}


def candidate_params(estimate: GradientEstimate) -> dict[str, Any]:
    """The swept parameters of a candidate."""
    if isinstance(estimate, Adjoint):
        return {"n": estimate.n, "beta": estimate.beta}
    if isinstance(estimate, Unrolled):
        return {"n": estimate.n, "k": estimate.k, "lam": estimate.lam}
    raise TypeError(f"not a sweep candidate: {estimate!r}")


def run_sweep(
    estimator: DEQEstimator,
    config: SweepConfig,
    x_dev: np.ndarray,
    y_dev: np.ndarray,
    threat: ThreatModel,
    defenses: Mapping[str, Readout],
    criterion: str,
    shards: Shards,
    *,
    seed: int = 0,
    done: Mapping[str, dict[str, Any]] | None = None,
    on_entry: Any = None,
) -> tuple[dict[str, GradientEstimate], list[dict[str, Any]]]:
    """Score every candidate on the development split and choose, per family, the one under
    which the defense ``criterion`` (the early-state defense) has the lowest accuracy.

    Args:
        done: finished entries by estimate repr (resume); ``on_entry(entry)`` is called after
            each new one.

    Returns:
        (family -> chosen estimate, the whole sweep: one entry per candidate with its
        family, parameters, accuracy of every defense and of every iterate z_n).
    """
    if criterion not in defenses:
        raise ValueError(f"criterion defense {criterion!r} is not among {sorted(defenses)}")
    chosen: dict[str, GradientEstimate] = {}
    entries: list[dict[str, Any]] = []
    for family, candidates in config.candidates(estimator.deq.solver.threshold).items():
        accuracies = []
        for estimate in candidates:
            key = repr(estimate)
            entry = (done or {}).get(key)
            if entry is None:
                scores = shared_pgd_scores(
                    estimator, estimate, x_dev, y_dev, threat, defenses, shards, seed=seed
                )
                entry = {
                    "family": family,
                    "estimate": key,
                    "params": candidate_params(estimate),
                    "accuracy": {d: float(scores[f"defense/{d}"].mean()) for d in defenses},
                    "state_accuracy": scores["states"].mean(axis=0).tolist(),
                }
                if on_entry is not None:
                    on_entry(entry)
            entries.append(entry)
            accuracies.append(entry["accuracy"][criterion])
        if candidates:
            chosen[family] = candidates[choose_strongest(accuracies)]
    return chosen, entries
