"""Verdict mode: the cascade cut to the columns the development split shows are needed, and an
audit of the columns it skips.

Per defense:

1. The cover, on the development split: the cascade (strongest first, each column on the
   samples still robust) keeps every column that breaks a development sample no earlier column
   broke. Of a kept column and a cheaper skipped one that also breaks every sample the kept one
   broke first, the cheaper is kept instead (cost: f evaluations per sample, ``cost``).
2. The test split: the cascade over the kept columns only.
3. The audit: a seeded random subsample of ``audit_size`` test survivors faces every skipped
   column. A skipped column that breaks an audited sample is then run on every survivor
   (escalation). The columns left skipped broke none of the audited samples: with m audited
   of the survivors, the one-sided 95% Clopper-Pearson bound 1 - 0.05^(1/m) bounds the
   fraction of the other survivors they would break (0 when every survivor was audited), and
   the report widens the robust accuracy's interval by it.

Every column's result on a sample depends on the sample alone (per-sample seeds,
``adversarial.seeds``): running it on a subset (the cover, the audit, the escalation) gives the
result the full table would give, so a sample broken in this mode is broken in the table,
and an audited survivor is robust in the table.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.aggregate import clopper_pearson_upper
from deq_attacks.evaluation.attacks import Column
from deq_attacks.evaluation.cascade import DevStrengths, cascade_cells, spread
from deq_attacks.evaluation.cells import NOT_RUN, Cells
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.scores import Scores
from deq_attacks.evaluation.shared_runs import clean_scores

CONFIDENCE = 0.95
"""One-sided confidence of the audit's bound."""


def verdict_cells(
    ctx: RunContext,
    columns: Sequence[Column],
    defenses: Mapping[str, Readout],
    clean: Scores,
    strengths: DevStrengths,
    costs: Mapping[str, float | None],
) -> tuple[Cells, dict[str, dict[str, Any]]]:
    """The cover, the cascade of the kept columns and the audit (module docstring).

    Args:
        costs: column label -> f evaluations per sample (None: unknown, never swapped in).

    Returns:
        the cells (every column that ran, on the samples it ran on) and per defense the
        audit's record: ``kept``, ``skipped``, ``swapped``, ``survivors``, ``size``,
        ``audited`` (test indices), ``broke`` (skipped column -> audited samples it broke),
        ``broken`` (audited samples some skipped column broke), ``escalated``, ``unaudited``
        (survivors never audited), ``bound``.
    """
    with ctx.step("cover"):
        ctx.say("development split: the cascade's cover of the breaks (verdict mode)")
        dev_clean = _dev_clean(ctx, defenses)
        dev = cascade_cells(ctx, columns, defenses, dev_clean, strengths, development=True)
        covers = {
            d: cover(ctx, columns, d, readout, dev, costs) for d, readout in defenses.items()
        }
    keep = {d: kept for d, (kept, _) in covers.items()}
    cells = cascade_cells(ctx, columns, defenses, clean, strengths, keep=keep)
    audits = {}
    with ctx.step("audit"):
        for d, readout in defenses.items():
            audits[d] = audit(ctx, columns, d, readout, cells, clean, keep[d])
            audits[d]["swapped"] = covers[d][1]
    return cells, audits


def _dev_clean(ctx: RunContext, defenses: Mapping[str, Readout]) -> Scores:
    done = ctx.store.get("dev/clean")
    if done is None:
        scores = clean_scores(ctx.estimator, ctx.x_dev, ctx.y_dev, defenses, ctx.shards)
        done = ctx.store.put("dev/clean", Scores(scores.correct, scores.finite).arrays())
    return Scores.from_arrays(done)


def first_breakers(cells: Cells, defense: str, n: int) -> list[str]:
    """Per sample: the first column (in run order) that broke it, "" if none did."""
    row = cells.survived[defense]
    return [next((c for c in cells.order[defense] if row[c][i] == 0), "") for i in range(n)]


def cover(
    ctx: RunContext,
    columns: Sequence[Column],
    defense: str,
    readout: Readout,
    dev: Cells,
    costs: Mapping[str, float | None],
) -> tuple[list[str], dict[str, str]]:
    """The columns the development cascade needs against ``defense`` (each broke a sample no
    earlier one broke; the ready-made PGD always), a kept column replaced by a cheaper one
    that breaks every development sample it broke first. Returns (kept labels in run order,
    kept label -> the cheaper label that replaced it)."""
    n = len(ctx.x_dev)
    first = np.array(first_breakers(dev, defense, n), dtype=object)
    ready = next(c.label for c in columns if c.shared and c.estimate == ctx.ready)
    needed = [c for c in dev.order[defense] if c == ready or (first == c).any()]
    kept, swapped = list(needed), {}
    for label in needed:
        cost = costs.get(label)
        if label == ready or cost is None:
            continue
        broke = np.flatnonzero(first == label)
        cheaper = sorted(
            (c for c in columns if c.label not in kept and (costs.get(c.label) or cost) < cost),
            key=lambda c: costs[c.label] or 0.0,
        )
        for column in cheaper:
            known = dev.survived[defense][column.label][broke]
            todo = broke[known == NOT_RUN]
            if len(todo):
                key = f"dev/swap/{defense}/{label}/{column.label}"
                scores = ctx.run_column(
                    column, {defense: readout}, todo, development=True, key=key
                )
                known = known.copy()
                known[known == NOT_RUN] = scores.correct[defense].astype(np.int8)
            if not known.any():  # it breaks every one of them
                kept[kept.index(label)] = column.label
                swapped[label] = column.label
                break
    return kept, swapped


def audit(
    ctx: RunContext,
    columns: Sequence[Column],
    defense: str,
    readout: Readout,
    cells: Cells,
    clean: Scores,
    kept: Sequence[str],
) -> dict[str, Any]:
    """The audit of the skipped columns against ``defense`` on the test survivors of the kept
    ones, and the escalation of every skipped column that breaks an audited sample (module
    docstring); ``cells`` is updated in place."""
    n = len(ctx.x)
    row = cells.survived[defense]
    alive = clean.correct[defense] & ~np.any(
        [row[c] == 0 for c in row], axis=0
    )
    survivors = np.flatnonzero(alive)
    skipped = [c for c in columns if c.label not in kept]
    size = min(ctx.config.audit_size, len(survivors))
    rng = np.random.default_rng([ctx.config.seed, zlib.crc32(defense.encode())])
    audited = np.sort(rng.choice(survivors, size, replace=False)) if size else survivors[:0]
    broke: dict[str, int] = {}
    broken = np.zeros(n, dtype=bool)
    for column in skipped:
        cells.order[defense].append(column.label)
        if not size:
            broke[column.label] = 0
            continue
        ctx.say(f"audit: {column.label} against {defense} on {size} survivors")
        correct = _run(ctx, f"audit/{defense}", column, defense, readout, cells, audited, n)
        broke[column.label] = int((~correct).sum())
        broken[audited[~correct]] = True
    escalated = [label for label, count in broke.items() if count]
    in_audit = np.zeros(n, dtype=bool)
    in_audit[audited] = True
    for column in (c for c in skipped if c.label in escalated):
        rest = np.flatnonzero(alive & ~in_audit & ~np.any([row[c] == 0 for c in row], axis=0))
        if not len(rest):
            continue
        ctx.say(f"escalation: {column.label} against {defense} on {len(rest)} survivors")
        _run(ctx, f"escalate/{defense}", column, defense, readout, cells, rest, n)
    robust = alive & ~np.any([row[c] == 0 for c in row], axis=0)
    unaudited = int((robust & ~in_audit).sum())
    missed = sum(count for label, count in broke.items() if label not in escalated)
    return {
        "kept": list(kept),
        "skipped": [c.label for c in skipped],
        "survivors": len(survivors),
        "size": int(size),
        "audited": audited.tolist(),
        "broke": broke,
        "broken": int(broken.sum()),
        "escalated": escalated,
        "unaudited": unaudited,
        "confidence": CONFIDENCE,
        "bound": clopper_pearson_upper(missed, int(size), CONFIDENCE) if unaudited else 0.0,
    }


def _run(
    ctx: RunContext,
    prefix: str,
    column: Column,
    defense: str,
    readout: Readout,
    cells: Cells,
    indices: np.ndarray,
    n: int,
) -> np.ndarray:
    """``column`` against ``defense`` on the test samples ``indices``, its cells filled in;
    returns their correctness."""
    key = f"{prefix}/{column.label}"
    scores = ctx.run_column(column, {defense: readout}, indices, key=key)
    correct = scores.correct[defense]
    cells.survived[defense][column.label][indices] = correct
    extra = scores.extras.get(key)
    if extra and not column.shared:
        merged = cells.extras.setdefault(
            f"{defense}/{column.label}", {k: [None] * n for k in extra}
        )
        for name, values in extra.items():
            spread_values, target = spread(values, indices, n), merged.setdefault(name, [None] * n)
            for i in indices.tolist():
                target[i] = spread_values[i]
    return correct
