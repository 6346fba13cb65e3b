"""Verdict mode: the cascade cut to the columns the development split shows are needed, and an
audit of the columns it skips.

1. The cover, per defense: the ready-made PGD (the diagnostics read it) and the strongest
   column (``strongest_column``: the yardstick's AutoAttack, BPTT's true gradient, where
   the protocol has it) are always kept. On the development split (or on a seeded
   random subset of ``cover_size`` of its images; 0: no cover) the cascade (strongest first,
   each column on the samples still robust) keeps every column that breaks a development
   sample no earlier column broke. Of a kept column and a cheaper skipped one
   that also breaks every sample the kept one broke first, the cheaper is kept instead (cost:
   f evaluations per sample, ``cost``).
2. The test split: the cascade over the kept columns only.
3. The audit: per defense, ``audit_size`` test survivors drawn at random face every skipped
   column. The draws of the defenses are coupled: one seeded random order of the test
   samples, and each defense audits the first ``audit_size`` of its survivors in that order,
   a uniform random sample of its own survivors that overlaps the other defenses' as far as
   their survivors do, so a skipped shared column (one PGD run scores every defense) runs
   once on the union. The skipped columns run as a cascade, cheapest first: an audited
   sample broken by one skips the next; the column that broke it first is escalated: run
   on every survivor of the defense. The columns left skipped broke none of the audited
   samples (an audited sample that no escalated column broke faced every skipped column):
   with m audited of the survivors, the one-sided 95% Clopper-Pearson bound
   1 - 0.05^(1/m) bounds the fraction of the other survivors they would break (0 when every
   survivor was audited), and the report widens the robust accuracy's interval by it.

Every column's result on a sample depends on the sample alone (per-sample seeds,
``adversarial.seeds``): running it on a subset (the cover, the audit, the escalation) gives the
result the full table would give, so a sample broken in this mode is broken in the table,
and an audited survivor is robust in the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deq_attacks.adversarial.seeds import named_rng
from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.aggregate import clopper_pearson_upper
from deq_attacks.evaluation.attacks import Column
from deq_attacks.evaluation.cascade import DevStrengths, cascade_cells, cascade_order, spread
from deq_attacks.evaluation.cells import NOT_RUN, Cells
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.scores import Scores
from deq_attacks.evaluation.shared_runs import clean_scores
from deq_attacks.gradients import BackpropThroughSolver

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
        audit's record: ``kept``, ``skipped``, ``swapped``, ``cover_images``, ``survivors``,
        ``size``, ``audited`` (test indices), ``shared`` (of them, audited for every defense),
        ``broke`` (skipped column -> audited samples it broke first), ``broken`` (audited
        samples some skipped column broke), ``escalated``, ``unaudited`` (survivors never
        audited), ``bound``.
    """
    ready = next(c.label for c in columns if ctx.is_ready(c))
    with ctx.step("cover"):
        strongest = {
            d: strongest_column(columns, d, strengths, ready) if clean.correct[d].any() else ready
            for d in defenses
        }
        dev_ctx = cover_context(ctx)
        if len(dev_ctx.x_dev):
            ctx.say(
                f"development split: the cascade's cover of the breaks on {len(dev_ctx.x_dev)} "
                "images (verdict mode)"
            )
            dev_clean = _dev_clean(dev_ctx, defenses)
            dev = cascade_cells(dev_ctx, columns, defenses, dev_clean, strengths, development=True)
            covers = {
                d: cover(dev_ctx, columns, d, readout, dev, costs, strongest[d])
                for d, readout in defenses.items()
            }
        else:
            covers = {d: (list(dict.fromkeys([ready, strongest[d]])), {}) for d in defenses}
    keep = {d: kept for d, (kept, _) in covers.items()}
    cells = cascade_cells(ctx, columns, defenses, clean, strengths, keep=keep)
    with ctx.step("audit"):
        audits = audit(ctx, columns, defenses, cells, clean, keep, costs)
    for d in defenses:
        audits[d]["swapped"] = covers[d][1]
        audits[d]["cover_images"] = len(dev_ctx.x_dev)
    return cells, audits


def strongest_column(
    columns: Sequence[Column], defense: str, strengths: DevStrengths, ready: str
) -> str:
    """The column verdict mode always keeps against ``defense``: the yardstick's (backprop
    through the solver: the true gradient of the defended output) attack that looks at the
    defended output (AutoAttack) where the protocol has it, else the first column of the
    cascade's per-defense order (the strongest estimate by the development PGD); ``ready``
    (the ready-made PGD's label) where every column is shared."""
    per_defense = [c for c in columns if not c.shared]
    if not per_defense:
        return ready
    yardstick = [c for c in per_defense if isinstance(c.estimate, BackpropThroughSolver)]
    if yardstick:
        return min(yardstick, key=lambda c: (c.attack.shared, per_defense.index(c))).label
    return cascade_order(columns, defense, strengths)[0].label


def cover_context(ctx: RunContext) -> RunContext:
    """``ctx`` with its development split cut to the cover's images: a random subset of
    ``cover_size`` of them, seeded by the run's seed, in their order (all where None or not
    fewer)."""
    size = ctx.config.cover_size
    n = len(ctx.x_dev)
    if size is None or size >= n:
        return ctx
    rng = named_rng(ctx.config.seed, "cover")
    chosen = np.sort(rng.choice(n, size, replace=False))
    return dataclasses.replace(ctx, x_dev=ctx.x_dev[chosen], y_dev=ctx.y_dev[chosen])


def _dev_clean(ctx: RunContext, defenses: Mapping[str, Readout]) -> Scores:
    done = ctx.store.get("dev/clean")
    if done is None:
        scores = clean_scores(ctx.model, ctx.x_dev, ctx.y_dev, defenses, ctx.shards)
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
    strongest: str,
) -> tuple[list[str], dict[str, str]]:
    """The columns the development cascade needs against ``defense`` (each broke a sample no
    earlier one broke; the ready-made PGD and the ``strongest`` column always), a kept column
    replaced by a cheaper one that breaks every development sample it broke first. Returns
    (kept labels in run order, kept label -> the cheaper label that replaced it)."""
    n = len(ctx.x_dev)
    first = np.array(first_breakers(dev, defense, n), dtype=object)
    ready = next(c.label for c in columns if ctx.is_ready(c))
    always = (ready, strongest)
    needed = [c for c in dev.order[defense] if c in always or (first == c).any()]
    kept, swapped = list(needed), {}
    for label in needed:
        cost = costs.get(label)
        if label in always or cost is None:
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
                scores = ctx.run_column(column, {defense: readout}, todo, development=True, key=key)
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
    defenses: Mapping[str, Readout],
    cells: Cells,
    clean: Scores,
    keep: Mapping[str, Sequence[str]],
    costs: Mapping[str, float | None],
) -> dict[str, dict[str, Any]]:
    """The audit of each defense's skipped columns on its test survivors of the kept ones, and
    the escalation of every skipped column that breaks an audited sample first (module
    docstring); ``cells`` is updated in place. Returns the record per defense."""
    n = len(ctx.x)

    def robust(d: str) -> np.ndarray:
        row = cells.survived[d]
        return clean.correct[d] & ~np.any([row[c] == 0 for c in row], axis=0)

    # one random order of the test samples for every defense: each audits its first survivors
    order = named_rng(ctx.config.seed, "audit").permutation(n)
    alive = {d: robust(d) for d in defenses}
    audited = {d: np.sort(order[alive[d][order]][: ctx.config.audit_size]) for d in defenses}
    skipped = {d: [c for c in columns if c.label not in keep[d]] for d in defenses}
    for d in defenses:
        cells.order[d].extend(c.label for c in skipped[d])
    by_cost = sorted(
        {c.label: c for d in defenses for c in skipped[d]}.values(),
        key=lambda c: (costs.get(c.label) is None, costs.get(c.label) or 0.0),
    )
    in_audit = {d: np.isin(np.arange(n), audited[d]) for d in defenses}
    broke = {d: {c.label: 0 for c in skipped[d]} for d in defenses}
    for column in by_cost:  # the cascade over the skipped columns, cheapest first
        todo = {d: audited[d][robust(d)[audited[d]]] for d in defenses if column in skipped[d]}
        if not any(len(indices) for indices in todo.values()):
            continue  # every audited sample already broken
        ctx.say(
            f"audit: {column.label} against "
            + ", ".join(f"{d} on {len(i)}" for d, i in todo.items())
        )
        correct = _run(ctx, "audit", column, defenses, cells, todo, n)
        for d in todo:
            broke[d][column.label] = int((~correct[d]).sum())
    escalated = {d: [label for label, count in broke[d].items() if count] for d in defenses}
    for column in by_cost:
        rest = {
            d: np.flatnonzero(robust(d) & ~in_audit[d])
            for d in defenses
            if column.label in escalated[d]
        }
        rest = {d: indices for d, indices in rest.items() if len(indices)}
        if rest:
            ctx.say(
                f"escalation: {column.label} against "
                + ", ".join(f"{d} on {len(i)} survivors" for d, i in rest.items())
            )
            _run(ctx, "escalate", column, defenses, cells, rest, n)
    everywhere = np.all([in_audit[d] for d in defenses], axis=0)
    out = {}
    for d in defenses:
        unaudited = int((robust(d) & ~in_audit[d]).sum())
        size = len(audited[d])
        out[d] = {
            "kept": list(keep[d]),
            "skipped": [c.label for c in skipped[d]],
            "survivors": int(alive[d].sum()),
            "size": size,
            "audited": audited[d].tolist(),
            "shared": int(everywhere[audited[d]].sum()),
            "broke": broke[d],
            "broken": int(sum(broke[d].values())),
            "escalated": escalated[d],
            "unaudited": unaudited,
            "confidence": CONFIDENCE,
            # every column that broke an audited sample first was escalated: zero missed
            "bound": clopper_pearson_upper(0, size, CONFIDENCE) if unaudited else 0.0,
        }
    return out


def _run(
    ctx: RunContext,
    prefix: str,
    column: Column,
    defenses: Mapping[str, Readout],
    cells: Cells,
    todo: Mapping[str, np.ndarray],
    n: int,
) -> dict[str, np.ndarray]:
    """``column`` on the test samples ``todo[defense]`` against each defense in ``todo``: a
    shared column once on their union (scoring every one of them), any other once per
    defense; its cells filled in. Returns per defense the correctness of its samples."""
    if column.shared:
        union = np.unique(np.concatenate([todo[d] for d in todo]))
        if not len(union):
            return {d: np.ones(0, dtype=bool) for d in todo}
        readouts = {d: defenses[d] for d in todo}
        scores = ctx.run_column(column, readouts, union, key=f"{prefix}/shared/{column.label}")
        out = {}
        for d, indices in todo.items():
            correct = scores.correct[d]
            cells.survived[d][column.label][union] = correct
            out[d] = correct[np.searchsorted(union, indices)]
        return out
    out = {}
    for d, indices in todo.items():
        if not len(indices):
            out[d] = np.ones(0, dtype=bool)
            continue
        key = f"{prefix}/{d}/{column.label}"
        found = ctx.run_column(column, {d: defenses[d]}, indices, key=key)
        correct = found.correct[d]
        cells.survived[d][column.label][indices] = correct
        out[d] = correct
        extra = found.extras.get(key)
        if extra:
            merged = cells.extras.setdefault(f"{d}/{column.label}", {k: [None] * n for k in extra})
            for name, values in extra.items():
                spread_values, target = (
                    spread(values, indices, n),
                    merged.setdefault(name, [None] * n),
                )
                for i in indices.tolist():
                    target[i] = spread_values[i]
    return out
