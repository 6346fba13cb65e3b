"""What the protocol found: per-sample survival of every cell, the sweep, the choices and
the diagnostics; the survival matrix and JSON views of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deq_attacks.evaluation.aggregate import SurvivalMatrix
from deq_attacks.evaluation.diagnostics import Check
from deq_attacks.evaluation.store import jsonable


@dataclass
class EvaluationReport:
    """Everything the protocol found. Per-sample arrays are lists of the test samples in order.

    Attributes:
        settings: the configuration, the threat model and the fingerprint.
        early_exit: n*, chosen on the development split.
        development: per-iterate clean and ready-made-PGD accuracy and residual (dev split).
        sweep: one entry per intermediate-attack candidate (Fig. 3/4 data).
        chosen: family -> repr of the chosen intermediate estimate.
        defenses: defense name -> repr of its readout.
        columns: column label -> its settings.
        clean: defense -> per-sample clean correctness.
        survived: defense -> column -> per-sample survival (clean-correct and correct under
            the attack).
        extras: "<defense>/<column>" -> per-sample extras (AutoAttack's per-attack results).
        states: test-split per-iterate clean and ready-made accuracy and mean residual.
        diagnostics: the checks with verdicts.
    """

    settings: dict[str, Any]
    early_exit: int
    development: dict[str, Any]
    sweep: list[dict[str, Any]]
    chosen: dict[str, str]
    defenses: dict[str, str]
    columns: dict[str, dict[str, Any]]
    clean: dict[str, list[bool]]
    survived: dict[str, dict[str, list[bool]]]
    extras: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    states: dict[str, list[float]] = field(default_factory=dict)
    diagnostics: list[Check] = field(default_factory=list)

    def matrix(self) -> SurvivalMatrix:
        names, labels = list(self.defenses), list(self.columns)
        survived = np.array([[self.survived[d][c] for c in labels] for d in names], dtype=bool)
        clean = np.array([self.clean[d] for d in names], dtype=bool)
        return SurvivalMatrix(names, labels, survived, clean)

    def to_json(self) -> dict[str, Any]:
        matrix = self.matrix()
        return jsonable(
            {
                "settings": self.settings,
                "early_exit": self.early_exit,
                "white_box_robustness": {
                    "paper": matrix.paper_robustness().__dict__,
                    "per_sample": matrix.per_sample_robustness().__dict__,
                },
                "per_defense": {
                    "paper": [r.__dict__ for r in matrix.paper_worst()],
                    "per_sample": [r.__dict__ for r in matrix.per_sample_worst()],
                },
                "column_accuracy": {
                    d: dict(zip(matrix.columns, row.tolist(), strict=True))
                    for d, row in zip(matrix.defenses, matrix.column_accuracy(), strict=True)
                },
                "development": self.development,
                "sweep": self.sweep,
                "chosen": self.chosen,
                "defenses": self.defenses,
                "columns": self.columns,
                "clean": self.clean,
                "survived": self.survived,
                "extras": self.extras,
                "states": self.states,
                "diagnostics": [c.to_json() for c in self.diagnostics],
            }
        )
