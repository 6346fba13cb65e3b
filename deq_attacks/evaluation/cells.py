"""The cells of the evaluation: per defense and column, each test sample's result;
``column_scores`` runs one column on its own, outside a protocol run."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.deq.convergence import ConvergenceLog
from deq_attacks.deq.readout import Final, Readout
from deq_attacks.evaluation.attacks import Column
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.scores import Scores
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.evaluation.shared_runs import clean_scores
from deq_attacks.evaluation.store import ResultStore
from deq_attacks.gradients import ready_made
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
        ready_scores: the ready-made PGD's shared run on every sample (None until it ran).
        order: defense -> the columns in the order they ran.
        nonfinite: defense -> column -> how many attacked samples' defended logits held a NaN
            or an infinity (those samples count as not robust: ``scoring.correct``).
    """

    survived: dict[str, dict[str, np.ndarray]]
    extras: dict[str, dict[str, list[object]]] = field(default_factory=dict)
    ready_scores: Scores | None = None
    order: dict[str, list[str]] = field(default_factory=dict)
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, defense: str, column: str, scores: Scores) -> None:
        """Count the samples of a column's ``scores`` whose ``defense`` logits were not finite."""
        finite = scores.finite.get(defense)
        count = 0 if finite is None else int((~np.asarray(finite, dtype=bool)).sum())
        self.nonfinite.setdefault(defense, {})[column] = count

    @classmethod
    def table(cls, defenses: Iterable[str], columns: Sequence[Column]) -> Cells:
        """The empty cells of table mode (every column on every sample), in column order."""
        names = list(defenses)
        return cls({d: {} for d in names}, order={d: [c.label for c in columns] for d in names})

    def add_column(self, column: Column, scores: Scores, ready: bool) -> None:
        """Table mode: ``column``'s ``scores`` of every sample for each defense, and its
        per-sample extras; kept as ``ready_scores`` if it is the ready-made PGD (``ready``,
        ``RunContext.is_ready``)."""
        for name in self.survived:
            self.survived[name][column.label] = scores.correct[name].astype(np.int8)
            self.record(name, column.label, scores)
        if not column.shared:
            for run, extra in scores.extras.items():
                if extra:
                    self.extras[run] = {k: v.tolist() for k, v in extra.items()}
        if ready:
            self.ready_scores = scores

    @property
    def ready(self) -> Scores:
        """``ready_scores``, which every mode computes on every sample."""
        if self.ready_scores is None:
            raise RuntimeError("the ready-made PGD's shared run is missing")
        return self.ready_scores


def column_scores(
    model: DefendedModel | DEQEstimator,
    x: np.ndarray,
    y: np.ndarray,
    config: EvaluationConfig,
    column: Column | None = None,
    defenses: Mapping[str, Readout] | None = None,
) -> Scores:
    """One column of the protocol on its own, outside a protocol run: per-sample correctness
    of each defense under ``column`` (None: the clean inputs), computed as the protocol
    computes that column's cells (``RunContext.run_column`` over a store in memory: the same
    per-sample seeds for the same label, so the same result), in blocks of
    ``config.attack_batch`` sharded across torchrun's processes.

    Build columns with ``protocol_columns`` (``deq_attacks.evaluation``), e.g.
    ``protocol_columns({"exact": Exact()}, dataclasses.replace(config, attacks="pgd"))``.

    Args:
        model: the defended model (an ART ``DEQEstimator`` is read by ``DefendedModel.of``).
        x, y: images (S, C, H, W) float32 in [0, 1] and labels (S,).
        defenses: name -> readout (default ``{"final": Final()}``); a shared column (the
            fixed-step PGD) scores all from one run, any other runs once per defense.

    Returns:
        ``Scores``: ``correct`` and ``finite`` bool (S,) per defense; clean and for a shared
        column also ``states`` bool (S, N) and ``residuals`` float (S, N) of every iterate;
        the attack's per-sample extras by run (``"shared/<label>"`` or
        ``"<defense>/<label>"``).
    """
    chosen = dict(defenses) if defenses is not None else {"final": Final()}
    defended = as_defended(model)
    shards = Shards.current(config.attack_batch(defended.device))
    if column is None:
        return clean_scores(defended, x, y, chosen, shards)
    ctx = RunContext(
        defended, x, y, x[:0], y[:0], config, ResultStore(None, {}, shards), shards,
        lambda _text: None, ConvergenceLog(), ready_made(defended.deq.training_gradient),
    )  # fmt: skip
    return ctx.run_column(column, chosen, np.arange(len(x)))
