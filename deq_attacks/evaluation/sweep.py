"""The sweep for the strongest intermediate attack (Sec. 5.1, Fig. 3 and 4), on the
development split, over every registered sweep family (``deq_attacks.gradients.sweep_family``:
``Adjoint(n, beta)`` over n and beta, ``Unrolled(n, k, lam)`` over n, k and lambda, and any
family registered after them). Each candidate is one shared PGD run that scores every defense
and every iterate; the paper chooses, per family, the candidate with the largest drop of the
early-state defense."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.aggregate import choose_strongest
from deq_attacks.evaluation.attacks import ThreatModel
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.shared_runs import shared_pgd_scores
from deq_attacks.gradients import (
    FamilyPlan,
    GradientEstimate,
    PerStepEstimate,
    estimate_spec,
    sweep_families,
    sweep_family,
)
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.solvers import Solver


@dataclass(frozen=True)
class SweepConfig:
    """Overrides of the families' default grids: family -> parameter -> "all" (the step
    index: 1..N) or comma-separated values, e.g. ``{"unrolled": {"k": "1,5", "lam": "1.0"}}``.
    A family or parameter left out keeps its default (``SweepFamily.defaults()``). Validated at
    construction against the registered families and their declared parameters.
    """

    grids: Mapping[str, Mapping[str, str]] = field(
        default_factory=dict,
        metadata={"help": "per-family grid overrides, e.g. {'unrolled': {'k': '1,5'}}"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.grids, Mapping):
            raise TypeError(f"grids must map a family to its grid, got {self.grids!r}")
        grids: dict[str, dict[str, str]] = {}
        for name, grid in self.grids.items():
            family = sweep_family(name)
            if not isinstance(grid, Mapping):
                raise TypeError(f"grid of {name!r} must map parameter -> values, got {grid!r}")
            for param, text in grid.items():
                parameter = family.parameter(param)
                try:
                    parameter.parse(text)
                except (ValueError, TypeError) as error:
                    raise type(error)(f"sweep {name}.{error}") from None
            grids[name] = dict(grid)
        object.__setattr__(self, "grids", grids)

    def __hash__(self) -> int:
        return hash(tuple((f, tuple(sorted(g.items()))) for f, g in sorted(self.grids.items())))

    @classmethod
    def from_items(cls, items: Iterable[str]) -> SweepConfig:
        """From command-line items ``FAMILY.PARAM=VALUES`` (``unrolled.k=1,5``)."""
        grids: dict[str, dict[str, str]] = {}
        for item in items:
            key, sep, values = item.partition("=")
            family, dot, param = key.strip().partition(".")
            if not sep or not dot or not family or not param:
                raise ValueError(f"--sweep expects FAMILY.PARAM=VALUES, got {item!r}")
            grids.setdefault(family, {})[param] = values.strip()
        return cls(grids)

    def updated(self, grids: Mapping[str, Mapping[str, str]]) -> SweepConfig:
        """This config with the given family grids overriding its own, parameter by parameter."""
        merged = {name: dict(grid) for name, grid in self.grids.items()}
        for name, grid in grids.items():
            merged.setdefault(name, {}).update(grid)
        return SweepConfig(merged)

    def grid(self, family: str) -> dict[str, str]:
        """The grid of ``family``: its defaults with this config's overrides."""
        return {**sweep_family(family).defaults(), **self.grids.get(family, {})}

    def plan(self, solver: Solver) -> list[FamilyPlan]:
        """What every registered family does over ``solver`` (decided before any work)."""
        for name in self.grids:
            sweep_family(name)  # a family unregistered since construction fails here
        return [family.plan(solver) for family in sweep_families()]

    def candidates(self, solver: Solver) -> dict[str, list[PerStepEstimate]]:
        """The candidates of each family that runs over ``solver``, in registration order."""
        chosen = {}
        for plan in self.plan(solver):
            if plan.runs:
                family = sweep_family(plan.family)
                grid = self.grid(plan.family)
                candidates = family.candidates(grid, solver.threshold, plan)
                for estimate in candidates:
                    estimate.check(solver)
                chosen[plan.family] = candidates
        return chosen


def add_sweep_option(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--sweep FAMILY.PARAM=VALUES`` option (``SweepConfig.from_items``)."""
    defaults = " ".join(
        f"{family.name}.{param}={text}"
        for family in sweep_families()
        for param, text in family.defaults().items()
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="FAMILY.PARAM=VALUES",
        help="override one grid of the intermediate-attack sweep (repeatable); defaults: "
        + defaults,
    )


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
) -> tuple[dict[str, GradientEstimate], list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every candidate on the development split and choose, per family, the one under
    which the defense ``criterion`` (the early-state defense) has the lowest accuracy.

    The plan (per family: whether it runs over the model's solver, with which fixed settings,
    why) and every candidate are decided and checked before the first attack.

    Args:
        done: finished entries by estimate repr (resume); ``on_entry(entry)`` is called after
            each new one.

    Returns:
        (family -> chosen estimate, the whole sweep: one entry per candidate with its
        family, parameters, spec, accuracy of every defense and of every iterate z_n, the
        plan: one JSON record per family with its grid).
    """
    if criterion not in defenses:
        raise ValueError(f"criterion defense {criterion!r} is not among {sorted(defenses)}")
    solver = estimator.deq.solver
    plan = [{**p.to_json(), "grid": config.grid(p.family)} for p in config.plan(solver)]
    chosen: dict[str, GradientEstimate] = {}
    entries: list[dict[str, Any]] = []
    for name, candidates in config.candidates(solver).items():
        family = sweep_family(name)
        accuracies = []
        for estimate in candidates:
            key = repr(estimate)
            entry = (done or {}).get(key)
            if entry is None:
                scores = shared_pgd_scores(
                    estimator, estimate, x_dev, y_dev, threat, defenses, shards, seed=seed
                )
                entry = {
                    "family": name,
                    "estimate": key,
                    "params": family.params(estimate),
                    "spec": estimate_spec(estimate),
                    "accuracy": {d: float(scores[f"defense/{d}"].mean()) for d in defenses},
                    "state_accuracy": scores["states"].mean(axis=0).tolist(),
                }
                if on_entry is not None:
                    on_entry(entry)
            entries.append(entry)
            accuracies.append(entry["accuracy"][criterion])
        if candidates:
            chosen[name] = candidates[choose_strongest(accuracies)]
    return chosen, entries, plan
