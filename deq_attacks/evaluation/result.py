"""What the protocol found: per-sample results of every cell, the sweep, the choices, the
diagnostics and the run's records; the per-sample verdict, the survival matrix (table mode)
and JSON views of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deq_attacks.evaluation.aggregate import (
    Robustness,
    SurvivalMatrix,
    best_defense,
    wilson_interval,
)
from deq_attacks.evaluation.diagnostics import Check
from deq_attacks.evaluation.entropy_defense import EntropyDefenseResult
from deq_attacks.evaluation.scores import Development, Scores, SweepResult
from deq_attacks.evaluation.store import jsonable
from deq_attacks.gradients import GradientEstimate, estimate_spec
from deq_attacks.records import to_jsonable

if TYPE_CHECKING:
    from deq_attacks.deq.readout import Readout
    from deq_attacks.evaluation.attacks import Column
    from deq_attacks.evaluation.cells import Cells
    from deq_attacks.evaluation.context import RunContext


@dataclass
class EvaluationReport:
    """Everything the protocol found. Per-sample arrays are lists of the test samples in order.

    Attributes:
        settings: the configuration, the threat model, the fingerprint, the mode, the attack
            batch used, the sweep's plan for the solver.
        early_exit: n*, chosen on the development split.
        development: per-iterate clean and ready-made-PGD accuracy and residual (dev split).
        sweep: one entry per intermediate-attack candidate (Fig. 3/4 data).
        chosen: family -> repr of the chosen intermediate estimate.
        estimates: column estimate label -> its spec (``estimate_spec``: rebuildable with
            ``estimate_from_spec``).
        defenses: defense name -> repr of its readout.
        columns: column label -> its settings.
        clean: defense -> per-sample clean correctness.
        survived: defense -> column -> per-sample correctness under the column's attack (True,
            False, or None where a cascade did not attack the sample).
        order: defense -> the columns in the order they ran.
        extras: "<defense>/<column>" -> per-sample extras (AutoAttack's per-attack results).
        states: test-split per-iterate clean and ready-made accuracy and mean residual.
        diagnostics: the checks with verdicts.
        convergence: the run's ConvergenceLog records (one per call site of a forward).
        timings: per step, its wall seconds ``"wall_s"``, CPU seconds ``"cpu_s"`` and f
            evaluations ``"f_evals"``.
        audit: verdict mode, per defense: the kept and skipped columns, the audit's size, what
            it broke, the escalated columns and the bound (``verdict.audit``).
        cost: the expected f evaluations per step before the work, the seconds per f
            evaluation of the timed batch and the expected wall time (``estimate_cost``).
        entropy_defense: the input-entropy-reduction defense's columns (``--entropy_defense``;
            None when off). Not a readout: it does not count in ``robustness()``.
    """

    settings: dict[str, Any]
    early_exit: int
    development: dict[str, Any]
    sweep: list[dict[str, Any]]
    chosen: dict[str, str]
    estimates: dict[str, dict[str, Any]]
    defenses: dict[str, str]
    columns: dict[str, dict[str, Any]]
    clean: dict[str, list[bool]]
    survived: dict[str, dict[str, list[bool | None]]]
    order: dict[str, list[str]] = field(default_factory=dict)
    extras: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    states: dict[str, list[float]] = field(default_factory=dict)
    diagnostics: list[Check] = field(default_factory=list)
    convergence: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    audit: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    entropy_defense: EntropyDefenseResult | None = None

    @property
    def mode(self) -> str:
        return str(self.settings["mode"])

    def verdict(self) -> dict[str, np.ndarray]:
        """Per defense, bool (S,): the sample is robust (clean-correct, broken by no column).
        The same in both modes."""
        out = {}
        for d, row in self.survived.items():
            broken = np.array([[v is False for v in cells] for cells in row.values()])
            out[d] = np.asarray(self.clean[d], dtype=bool) & ~broken.any(axis=0)
        return out

    def broken_by(self) -> dict[str, list[str]]:
        """Per defense and sample: the first column (in run order) that broke it, "clean" if
        it was misclassified clean, "" if it is robust."""
        out = {}
        for d, row in self.survived.items():
            names = []
            for i, correct in enumerate(self.clean[d]):
                first = next((c for c in self.order[d] if row[c][i] is False), "")
                names.append(first if correct else "clean")
            out[d] = names
        return out

    def robustness(self) -> list[Robustness]:
        """Per defense: the per-sample robust accuracy with its 95% Wilson interval; in
        verdict mode its lower end widened by the audit's bound on the unaudited survivors
        that the skipped columns would break (``missed_bound``)."""
        result = []
        for d, robust in self.verdict().items():
            k, n = int(robust.sum()), len(robust)
            low, high = wilson_interval(k, n)
            low = max(0.0, low - self.missed_bound(d) / n)
            result.append(Robustness(d, k / n, low, high, k, n))
        return result

    def missed_bound(self, defense: str) -> float:
        """Verdict mode: the upper bound (one-sided 95%) on the number of robust samples the
        skipped columns would break: the audit's bound on the fraction times the unaudited
        survivors; 0 in the other modes."""
        audit = self.audit.get(defense)
        return float(audit["bound"]) * int(audit["unaudited"]) if audit else 0.0

    def cost_record(self) -> dict[str, Any]:
        """Expected (before the work) and counted f evaluations and wall seconds per step."""
        expected = dict(self.cost.get("steps", {}))
        return {
            **{k: v for k, v in self.cost.items() if k != "steps"},
            "expected_f_evals": expected,
            "actual_f_evals": {k: self.timings.get(k, {}).get("f_evals") for k in expected},
            "actual_wall_s": {k: self.timings.get(k, {}).get("wall_s") for k in expected},
        }

    def matrix(self) -> SurvivalMatrix:
        """The full (defense, column, sample) matrix; table mode only."""
        if self.mode != "table":
            raise ValueError(
                f"a {self.mode} report has no full matrix (columns skip the samples already "
                "broken): use verdict() / robustness(), or run in table mode"
            )
        names, labels = list(self.defenses), list(self.columns)
        survived = np.array([[self.survived[d][c] for c in labels] for d in names], dtype=bool)
        clean = np.array([self.clean[d] for d in names], dtype=bool)
        return SurvivalMatrix(names, labels, survived, clean)

    def column_accuracy(self) -> dict[str, dict[str, float]]:
        """Defense -> column label -> accuracy (a fraction: clean-correct and correct under
        the column's attack), columns in the report's order; table mode only."""
        matrix = self.matrix()
        return {
            d: dict(zip(matrix.columns, row.tolist(), strict=True))
            for d, row in zip(matrix.defenses, matrix.column_accuracy(), strict=True)
        }

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON; ``entropy_defense`` only when the defense was evaluated."""
        per_sample = self.robustness()
        robust: dict[str, Any] = {"per_sample": best_defense(per_sample).__dict__}
        per_defense: dict[str, Any] = {"per_sample": [r.__dict__ for r in per_sample]}
        column_accuracy = None
        if self.mode == "table":
            matrix = self.matrix()
            robust["paper"] = matrix.paper_robustness().__dict__
            per_defense["paper"] = [r.__dict__ for r in matrix.paper_worst()]
            column_accuracy = self.column_accuracy()
        return jsonable(
            {
                "settings": self.settings,
                "early_exit": self.early_exit,
                "white_box_robustness": robust,
                "per_defense": per_defense,
                "column_accuracy": column_accuracy,
                "verdict": {d: v.tolist() for d, v in self.verdict().items()},
                "broken_by": self.broken_by(),
                "development": self.development,
                "sweep": self.sweep,
                "chosen": self.chosen,
                "estimates": self.estimates,
                "defenses": self.defenses,
                "columns": self.columns,
                "clean": self.clean,
                "survived": self.survived,
                "order": self.order,
                "extras": self.extras,
                "states": self.states,
                "diagnostics": [c.to_json() for c in self.diagnostics],
                "convergence": self.convergence,
                "timings": self.timings,
                "audit": self.audit,
                "cost": self.cost_record(),
                **({} if self.entropy_defense is None else
                   {"entropy_defense": self.entropy_defense.to_json()}),  # fmt: skip
            }
        )


def _cell(value: int) -> bool | None:
    return None if value < 0 else bool(value)


@dataclass
class RunRecord:
    """What the steps of one protocol run found, for its report (``build_report``).

    Attributes:
        fingerprint: the store's fingerprint (settings, weights, data).
        development: the early-exit step's result; defenses: name -> readout.
        sweep: the sweep's result; estimates: the columns' estimates by label.
        columns: the columns in order; clean: the clean test scores; cells: the columns'.
        checks: the diagnostics; convergence: the ConvergenceLog records.
        audits: verdict mode's audit per defense; cost: the expected cost before the work.
        entropy_defense: the input-entropy-reduction defense's result, if it ran.
    """

    fingerprint: Mapping[str, Any]
    development: Development
    defenses: Mapping[str, Readout]
    sweep: SweepResult
    estimates: Mapping[str, GradientEstimate]
    columns: Sequence[Column]
    clean: Scores
    cells: Cells
    checks: Sequence[Check]
    convergence: list[dict[str, Any]]
    audits: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    cost: Mapping[str, Any] = field(default_factory=dict)
    entropy_defense: EntropyDefenseResult | None = None


def build_report(ctx: RunContext, record: RunRecord) -> EvaluationReport:
    """The report of a finished run."""
    config, sweep, cells, clean = ctx.config, record.sweep, record.cells, record.clean
    defenses, columns = record.defenses, record.columns
    assert clean.states is not None and clean.residuals is not None
    settings = {
        "config": to_jsonable(config),
        "threat": to_jsonable(ctx.threat),
        "fingerprint": dict(record.fingerprint),
        "mode": config.mode.value,
        "batch_size": ctx.batch,
        "device": ctx.model.device.type,
        "n_test": len(ctx.x),
        "n_development": len(ctx.x_dev),
        "processes": ctx.shards.world,
        "sweep_plan": sweep.plan,
        "solver": repr(ctx.model.deq.solver),
    }
    return EvaluationReport(
        settings=settings,
        early_exit=record.development.early_exit,
        development=dataclasses.asdict(record.development),
        sweep=sweep.entries,
        chosen={k: repr(v) for k, v in sweep.chosen.items()},
        estimates={label: estimate_spec(e) for label, e in record.estimates.items()},
        defenses={k: repr(v) for k, v in defenses.items()},
        columns={c.label: c.describe(ctx.threat) for c in columns},
        clean={d: list(map(bool, clean.correct[d])) for d in defenses},
        survived={
            d: {c.label: [_cell(int(v)) for v in cells.survived[d][c.label]] for c in columns}
            for d in defenses
        },
        order=cells.order,
        extras=cells.extras,
        states={
            "clean_accuracy": clean.per_state().tolist(),
            "ready_made_accuracy": cells.ready.per_state().tolist(),
            "residual": np.mean(clean.residuals, axis=0).tolist(),
        },
        diagnostics=list(record.checks),
        convergence=record.convergence,
        timings={k: dict(v) for k, v in ctx.timings.items()},
        audit={k: dict(v) for k, v in record.audits.items()},
        cost=dict(record.cost),
        entropy_defense=record.entropy_defense,
    )
