"""Cascade mode: per defense, the columns strongest first, each attacking only the samples still
robust. The per-sample verdict (a sample is robust only if it survives every column) is the
same as the full table's, because every column's per-sample result depends on the sample alone
(per-sample seeds, ``attacks.seeds``); the cells of samples already broken stay unattacked.

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
PGD run on the development split per remaining estimate (BPTT: per defense).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.attacks import Column
from deq_attacks.evaluation.cells import NOT_RUN, Cells, attack_cells, extras_of
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.shared_runs import shared_pgd_scores
from deq_attacks.gradients import GradientEstimate

Strengths = dict[str, dict[str, float]]
"""repr(estimate) -> defense -> development PGD accuracy (lower: stronger)."""


def dev_strengths(
    ctx: RunContext,
    estimates: Mapping[str, GradientEstimate],
    defenses: Mapping[str, Readout],
    development: Mapping[str, Any],
    sweep: Sequence[Mapping[str, Any]],
) -> Strengths:
    """Each estimate's development PGD accuracy per defense (see the module docstring)."""
    strengths: Strengths = {}
    n_star = int(development["early_exit"])
    ready = dict(development["pgd_accuracy"])
    ready["early"] = float(development["pgd_accuracy_per_state"][n_star - 1])
    strengths[repr(ctx.ready)] = {d: ready[d] for d in defenses}
    for entry in sweep:
        strengths.setdefault(entry["estimate"], dict(entry["accuracy"]))
    for label, estimate in estimates.items():
        if repr(estimate) in strengths:
            continue
        key = f"strength/{label}"
        found = ctx.store.get(key)
        if found is None:
            ctx.say(f"development split: PGD with {label} (cascade order)")
            runs = (
                {d: {d: r} for d, r in defenses.items()}
                if estimate.depends_on_defense
                else {"shared": dict(defenses)}
            )
            found = {}
            for readouts in runs.values():
                scores = shared_pgd_scores(
                    ctx.estimator.view(defense=next(iter(readouts.values()))), estimate,
                    ctx.x_dev, ctx.y_dev, ctx.threat, readouts, ctx.shards, seed=ctx.config.seed,
                )  # fmt: skip
                found.update({d: float(scores[f"defense/{d}"].mean()) for d in readouts})
            found = ctx.store.put(key, found)
        strengths[repr(estimate)] = dict(found)
    return strengths


def cascade_order(columns: Sequence[Column], defense: str, strengths: Strengths) -> list[Column]:
    """The per-defense columns (not shared) in cascade order (see the module docstring)."""
    position = {c.label: i for i, c in enumerate(columns)}

    def key(column: Column) -> tuple[float, float, int, int]:
        if column.estimate is None:  # no gradient: last
            return (1.0, 0.0, 0, position[column.label])
        strength = strengths[repr(column.estimate)][defense]
        return (0.0, strength, int(column.attack.shared), position[column.label])

    return sorted((c for c in columns if not c.shared), key=key)


def cascade_cells(
    ctx: RunContext,
    columns: Sequence[Column],
    defenses: Mapping[str, Readout],
    clean: Mapping[str, np.ndarray],
    strengths: Strengths,
) -> Cells:
    """The columns in cascade order, each on the samples still robust."""
    n = len(ctx.x)
    alive = {d: np.asarray(clean[f"defense/{d}"], dtype=bool).copy() for d in defenses}
    cells = Cells({d: {c.label: np.full(n, NOT_RUN, np.int8) for c in columns} for d in defenses})
    order: list[str] = []

    def mean_strength(column: Column) -> float:
        assert column.estimate is not None
        return float(np.mean(list(strengths[repr(column.estimate)].values())))

    shared = sorted(
        (c for c in columns if c.shared),
        key=lambda c: (not _is_ready(ctx, c), mean_strength(c)),
    )
    for column in shared:
        ready = _is_ready(ctx, column)
        indices = np.arange(n) if ready else np.flatnonzero(np.any(list(alive.values()), axis=0))
        order.append(column.label)
        if not len(indices):
            continue
        ctx.say(f"cascade: {column.label} on {len(indices)} samples (one run for every defense)")
        result = attack_cells(ctx, f"shared/{column.label}", column, defenses, indices)
        for d in defenses:
            correct = result[f"defense/{d}"].astype(bool)
            cells.survived[d][column.label][indices] = correct
            alive[d][indices] &= correct
        if ready:
            cells.ready_scores = result
    for d, readout in defenses.items():
        cells.order[d] = list(order)
        for column in cascade_order(columns, d, strengths):
            indices = np.flatnonzero(alive[d])
            cells.order[d].append(column.label)
            if not len(indices):
                continue
            ctx.say(f"cascade: {column.label} against {d} on {len(indices)} samples")
            key = f"{d}/{column.label}"
            result = attack_cells(ctx, key, column, {d: readout}, indices)
            correct = result[f"defense/{d}"].astype(bool)
            cells.survived[d][column.label][indices] = correct
            alive[d][indices] &= correct
            extra = extras_of(result)
            if extra:
                cells.extras[key] = {k: _spread(v, indices, n) for k, v in extra.items()}
    return cells


def _is_ready(ctx: RunContext, column: Column) -> bool:
    return column.attack.name == "pgd" and column.estimate == ctx.ready


def _spread(values: np.ndarray, indices: np.ndarray, n: int) -> list[object]:
    """Per-sample values of the attacked ``indices`` as a list over all ``n`` samples (None
    where not attacked)."""
    out: list[object] = [None] * n
    for i, value in zip(indices.tolist(), values.tolist()):
        out[i] = value
    return out
