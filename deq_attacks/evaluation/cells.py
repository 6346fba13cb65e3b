"""The cells of the evaluation: per defense and column, each test sample's result, and the run
of one column on a set of samples (the unit both modes are made of); ``column_scores`` runs one
column on its own, outside a protocol run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from deq_attacks.deq.readout import Final, Readout
from deq_attacks.evaluation.attacks import Column, SampleSeeds, precision
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.distributed import BlockResult, Shards, map_blocks
from deq_attacks.evaluation.scoring import score_readouts
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.interfaces import DEQEstimator

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
        nonfinite: defense -> column -> how many attacked samples' defended logits held a NaN
            or an infinity (those samples count as not robust: ``scoring.correct``).
    """

    survived: dict[str, dict[str, np.ndarray]]
    extras: dict[str, dict[str, list[object]]] = field(default_factory=dict)
    ready_scores: dict[str, np.ndarray] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=dict)
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, defense: str, column: str, result: Mapping[str, np.ndarray]) -> None:
        """Count the samples of a column's ``result`` whose ``defense`` logits were not finite."""
        finite = result.get(f"finite/{defense}")
        count = 0 if finite is None else int((~np.asarray(finite, dtype=bool)).sum())
        self.nonfinite.setdefault(defense, {})[column] = count


def runs_of(column: Column, defenses: Mapping[str, Readout]) -> dict[str, dict[str, Readout]]:
    """Store key -> the defenses one run of ``column`` scores: one shared run for a shared
    column (``Column.shared``), else one run per defense."""
    if column.shared:
        return {f"shared/{column.label}": dict(defenses)}
    return {f"{name}/{column.label}": {name: readout} for name, readout in defenses.items()}


def column_block(
    estimator: DEQEstimator,
    column: Column,
    x: np.ndarray,
    y: np.ndarray,
    readouts: Mapping[str, Readout],
    config: EvaluationConfig,
) -> Callable[[np.ndarray], BlockResult]:
    """The run of ``column`` on one block (sample indices ``part`` of ``x``, ``y``): the attack
    on a view with the column's estimate and the first of ``readouts``, with the samples' own
    seeds (``config.seed``, the column's label) in ``config.precision``, its adversarial
    examples scored for every readout. The block's result: ``"index"``, ``"defense/<name>"``,
    ``"finite/<name>"``, the attack's extras, and for a shared column ``"states"`` and
    ``"residuals"``."""
    first = next(iter(readouts.values()))

    def block(part: np.ndarray) -> BlockResult:
        model = estimator.view(estimate=column.estimate, defense=first)
        seeds = SampleSeeds(config.seed, column.label, part)
        with precision(model.device, config.precision):
            output = column.attack.run(model, x[part], y[part], config.threat, seeds)
        scores = score_readouts(estimator, output.x_adv, y[part], readouts, len(part))
        if not column.shared:
            scores = {k: v for k, v in scores.items() if k.startswith(("defense/", "finite/"))}
        return {"index": part, **scores, **output.extras}

    return block


def attack_cells(
    ctx: RunContext,
    key: str,
    column: Column,
    readouts: Mapping[str, Readout],
    indices: np.ndarray,
    *,
    development: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``column`` on the test samples ``indices`` (of the development split if
    ``development``) (``column_block``, block by block, each block stored). Returns per-sample
    arrays in the order of ``indices``: ``"index"``, ``"defense/<name>"``, the attack's
    extras, and for a shared column ``"states"`` and ``"residuals"`` (every iterate)."""
    x, y = (ctx.x_dev, ctx.y_dev) if development else (ctx.x, ctx.y)
    block = column_block(ctx.estimator, column, x, y, readouts, ctx.config)
    return ctx.blockwise(key, block, indices)


def column_scores(
    estimator: DEQEstimator,
    x: np.ndarray,
    y: np.ndarray,
    config: EvaluationConfig,
    column: Column | None = None,
    defenses: Mapping[str, Readout] | None = None,
) -> dict[str, np.ndarray]:
    """One column of the protocol on its own, outside a protocol run: per-sample correctness
    of each defense under ``column`` (None: the clean inputs), computed as the protocol
    computes that column's cells (the same per-sample seeds for the same label, so the same
    result), in blocks of ``config.attack_batch`` sharded across torchrun's processes.

    Build columns with ``protocol_columns`` (``deq_attacks.evaluation``), e.g.
    ``protocol_columns({"exact": Exact()}, dataclasses.replace(config, attacks="pgd"))``.

    Args:
        x, y: images (S, C, H, W) float32 in [0, 1] and labels (S,).
        defenses: name -> readout (default ``{"final": Final()}``); a shared column (the
            fixed-step PGD) scores all from one run, any other runs once per defense.

    Returns:
        ``"defense/<name>"`` bool (S,) for each defense (finite logits predicting the label)
        and ``"finite/<name>"`` bool (S,) (its logits all finite); clean and for a shared
        column also
        ``"states"`` bool (S, N) and ``"residuals"`` float (S, N) of every iterate
        (``score_readouts``); the attack's per-sample extras (a shared column's as they are,
        another's as ``"<defense>/<extra>"``).
    """
    chosen = dict(defenses) if defenses is not None else {"final": Final()}
    shards = Shards.current(config.attack_batch(estimator.device))
    if column is None:
        return map_blocks(
            lambda part: score_readouts(estimator, x[part], y[part], chosen, len(part)),
            len(x),
            shards,
        )
    out: dict[str, np.ndarray] = {}
    for readouts in runs_of(column, chosen).values():
        result = map_blocks(column_block(estimator, column, x, y, readouts, config), len(x), shards)
        result.pop("index", None)
        for key, value in result.items():
            scored = key.startswith(("defense/", "finite/")) or key in ("states", "residuals")
            out[key if scored or column.shared else f"{next(iter(readouts))}/{key}"] = value
    return out


def extras_of(result: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The attack's own per-sample extras in a result of ``attack_cells``."""
    scored = ("index", "states", "residuals")
    return {
        k: v
        for k, v in result.items()
        if k not in scored and not k.startswith(("defense/", "finite/"))
    }
