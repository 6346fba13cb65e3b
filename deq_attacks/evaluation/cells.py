"""The cells of the evaluation: per defense and column, each test sample's result, and the run
of one column on a set of samples (the unit both modes are made of)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.attacks import Column, SampleSeeds, precision
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.scoring import score_readouts

NOT_RUN = -1
"""A cell value: the column did not attack the sample (cascade: it was broken before)."""


@dataclass
class Cells:
    """What the columns found.

    Attributes:
        survived: defense -> column -> int8 (S,): 1 correct under the column's attack, 0 not,
            ``NOT_RUN`` not attacked.
        extras: ``"<defense>/<column>"`` -> per-sample extras (AutoAttack's per-attack
            results); samples not attacked hold None.
        ready_scores: the ready-made PGD's shared run on every sample (``score_readouts``).
        order: defense -> the columns in the order they ran.
    """

    survived: dict[str, dict[str, np.ndarray]]
    extras: dict[str, dict[str, list[object]]] = field(default_factory=dict)
    ready_scores: dict[str, np.ndarray] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=dict)


def runs_of(column: Column, defenses: Mapping[str, Readout]) -> dict[str, dict[str, Readout]]:
    """Store key -> the defenses one run of ``column`` scores: one shared run for a shared
    column (``Column.shared``), else one run per defense."""
    if column.shared:
        return {f"shared/{column.label}": dict(defenses)}
    return {f"{name}/{column.label}": {name: readout} for name, readout in defenses.items()}


def attack_cells(
    ctx: RunContext,
    key: str,
    column: Column,
    readouts: Mapping[str, Readout],
    indices: np.ndarray,
) -> dict[str, np.ndarray]:
    """Run ``column`` on the test samples ``indices`` (block by block, each block stored) on a
    view with the column's estimate and the first of ``readouts``, and score the adversarial
    examples for every readout. Returns per-sample arrays in the order of ``indices``:
    ``"index"``, ``"defense/<name>"``, the attack's extras, and for a shared column
    ``"states"`` and ``"residuals"`` (every iterate)."""
    first = next(iter(readouts.values()))

    def block(part: np.ndarray) -> dict[str, np.ndarray]:
        model = ctx.estimator.view(estimate=column.estimate, defense=first)
        seeds = SampleSeeds(ctx.config.seed, column.label, part)
        with precision(model.device, ctx.config.precision):
            output = column.attack.run(model, ctx.x[part], ctx.y[part], ctx.threat, seeds)
        scores = score_readouts(ctx.estimator, output.x_adv, ctx.y[part], readouts, len(part))
        if not column.shared:
            scores = {k: v for k, v in scores.items() if k.startswith("defense/")}
        return {"index": part, **scores, **output.extras}

    return ctx.blockwise(key, block, indices)


def extras_of(result: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The attack's own per-sample extras in a result of ``attack_cells``."""
    scored = ("index", "states", "residuals")
    return {k: v for k, v in result.items() if k not in scored and not k.startswith("defense/")}
