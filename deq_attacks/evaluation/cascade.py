"""Cascade mode: per defense, the columns strongest first, each attacking only the samples still
robust. The per-sample verdict (a sample is robust only if it survives every column) is the
same as the full table's, because every column's per-sample result depends on the sample alone
(per-sample seeds, ``adversarial.seeds``); the cells of samples already broken stay unattacked.

The order, chosen on the development split (it changes the cost, never the verdict):

1. The shared PGD columns (their adversaries serve every defense, one run each, at a fraction
   of a per-defense attack's cost) first: the ready-made PGD on every sample (the per-iterate
   curves and the robustness-accumulation and more-steps checks need it), then each other
   estimate's PGD on the samples still robust for some defense, strongest estimate first (the
   lowest development PGD accuracy averaged over the defenses).
2. Per defense, the other columns on that defense's samples still robust: estimates strongest
   first by their development PGD accuracy for that defense, each estimate's attacks that look
   at the defended output (AutoAttack) before its PGD when that PGD runs per defense (BPTT);
   the attacks that use no gradient (Square) last.

The development PGD accuracy of each estimate comes from runs already made (the early-exit run
for the ready-made estimate, the sweep for the chosen intermediate ones) or from one shared
PGD run on the development split per remaining estimate (BPTT: per defense), made only when
the order is needed: where the ready-made PGD leaves no sample robust, no other column runs and
no ordering run is made.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.attacks import Column
from deq_attacks.evaluation.cells import NOT_RUN, Cells
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.scores import Development, Scores, SweepResult
from deq_attacks.evaluation.shared_runs import shared_pgd_scores
from deq_attacks.gradients import GradientEstimate


class DevStrengths:
    """Each estimate's development PGD accuracy per defense (lower: stronger), from the runs
    already made or measured when first asked for (timed as the run's ``order`` step, stored).

    Args:
        ctx: the run.
        estimates: the columns' estimates by label.
        defenses: the defenses by name.
        development: the early-exit step's result (the ready-made estimate's accuracies).
        sweep: the sweep (its entries: the intermediate candidates' accuracies).
    """

    def __init__(
        self,
        ctx: RunContext,
        estimates: Mapping[str, GradientEstimate],
        defenses: Mapping[str, Readout],
        development: Development,
        sweep: SweepResult,
    ) -> None:
        self._ctx, self._defenses = ctx, defenses
        self._labels = {repr(e): label for label, e in estimates.items()}
        ready = {**development.pgd_accuracy, "early": development.early_pgd_accuracy}
        self._known = {repr(ctx.ready): {d: ready[d] for d in defenses}}
        for entry in sweep.entries:
            self._known.setdefault(entry["estimate"], dict(entry["accuracy"]))

    def __call__(self, estimate: GradientEstimate) -> dict[str, float]:
        """Defense name -> the development PGD accuracy under ``estimate``."""
        key = repr(estimate)
        if key not in self._known:
            with self._ctx.step("order"):
                self._known[key] = self._measure(self._labels[key], estimate)
        return self._known[key]

    def _measure(self, label: str, estimate: GradientEstimate) -> dict[str, float]:
        ctx, defenses = self._ctx, self._defenses
        key = f"strength/{label}"
        found = ctx.store.get(key)
        if found is not None:
            return dict(found)
        ctx.say(f"development split: PGD with {label} (cascade order)")
        runs = (
            [{d: r} for d, r in defenses.items()]
            if estimate.depends_on_defense
            else [dict(defenses)]
        )
        measured: dict[str, float] = {}
        for readouts in runs:
            scores = shared_pgd_scores(
                ctx.model.view(defense=next(iter(readouts.values()))), estimate,
                ctx.x_dev, ctx.y_dev, ctx.threat, readouts, ctx.shards, seed=ctx.config.seed,
            )  # fmt: skip
            measured.update({d: scores.accuracy(d) for d in readouts})
        return dict(ctx.store.put(key, measured))


def cascade_order(
    columns: Sequence[Column], defense: str, strengths: DevStrengths
) -> list[Column]:
    """The per-defense columns (not shared) in cascade order (see the module docstring)."""
    position = {c.label: i for i, c in enumerate(columns)}

    def key(column: Column) -> tuple[float, float, int, int]:
        if column.estimate is None:  # no gradient: last
            return (1.0, 0.0, 0, position[column.label])
        strength = strengths(column.estimate)[defense]
        return (0.0, strength, int(column.attack.shared), position[column.label])

    return sorted((c for c in columns if not c.shared), key=key)


def cascade_cells(
    ctx: RunContext,
    columns: Sequence[Column],
    defenses: Mapping[str, Readout],
    clean: Scores,
    strengths: DevStrengths,
    *,
    development: bool = False,
    keep: Mapping[str, Collection[str]] | None = None,
) -> Cells:
    """The columns in cascade order, each on the samples still robust.

    Args:
        development: run on the development split (store keys under ``dev/``).
        keep: defense -> the column labels that run against it (None: all); the ready-made
            PGD always runs on every sample, a shared column on the samples still robust for
            a defense that keeps it (and counts for those defenses only).
    """
    n = len(ctx.x_dev if development else ctx.x)
    kept = {d: set(keep[d]) if keep is not None else {c.label for c in columns} for d in defenses}
    alive = {d: clean.correct[d].copy() for d in defenses}
    cells = Cells({d: {c.label: np.full(n, NOT_RUN, np.int8) for c in columns} for d in defenses})
    order: dict[str, list[str]] = {d: [] for d in defenses}

    def any_alive() -> bool:
        return bool(np.any(list(alive.values())))

    def mean_strength(column: Column) -> float:
        if column.estimate is None:  # a shared column without a gradient (transfer): last
            return float("inf")
        return float(np.mean(list(strengths(column.estimate).values())))

    def run_shared(column: Column, users: list[str]) -> None:
        for d in users:
            order[d].append(column.label)
        indices = (
            np.arange(n)
            if ctx.is_ready(column)  # on every sample: the diagnostics read it
            else np.flatnonzero(np.any([alive[d] for d in users], axis=0))
        )
        if not len(indices):
            return
        ctx.say(f"cascade: {column.label} on {len(indices)} samples (one run for every defense)")
        scores = ctx.run_column(column, defenses, indices, development=development)
        for d in users:
            correct = scores.correct[d]
            cells.survived[d][column.label][indices] = correct
            alive[d][indices] &= correct
            cells.record(d, column.label, scores)
        if ctx.is_ready(column):
            cells.ready_scores = scores

    for column in (c for c in columns if c.shared and ctx.is_ready(c)):
        run_shared(column, list(defenses))
    others = [  # only those some defense keeps: no ordering run for a column never run
        c
        for c in columns
        if c.shared and not ctx.is_ready(c) and any(c.label in kept[d] for d in defenses)
    ]
    for column in sorted(others, key=mean_strength) if any_alive() and len(others) > 1 else others:
        users = [d for d in defenses if column.label in kept[d]]
        if users:
            run_shared(column, users)
    for d, readout in defenses.items():
        cells.order[d] = order[d]
        mine = [c for c in columns if c.label in kept[d]]
        per_defense = (
            cascade_order(mine, d, strengths)
            if alive[d].any() and sum(not c.shared for c in mine) > 1
            else [c for c in mine if not c.shared]  # nothing to order: no order runs
        )
        for column in per_defense:
            indices = np.flatnonzero(alive[d])
            cells.order[d].append(column.label)
            if not len(indices):
                continue
            ctx.say(f"cascade: {column.label} against {d} on {len(indices)} samples")
            scores = ctx.run_column(column, {d: readout}, indices, development=development)
            correct = scores.correct[d]
            cells.survived[d][column.label][indices] = correct
            alive[d][indices] &= correct
            cells.record(d, column.label, scores)
            for run, extra in scores.extras.items():
                if extra:
                    cells.extras[run] = {k: spread(v, indices, n) for k, v in extra.items()}
    return cells


def spread(values: np.ndarray, indices: np.ndarray, n: int) -> list[object]:
    """Per-sample values of the attacked ``indices`` as a list over all ``n`` samples (None
    where not attacked)."""
    out: list[object] = [None] * n
    for i, value in zip(indices.tolist(), values.tolist()):
        out[i] = value
    return out
