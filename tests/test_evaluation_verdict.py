"""Verdict mode (the audited cascade), the racing sweep and the cost before the work: a column
that alone breaks some samples is kept by the development split or escalated by the audit, so
the per-sample verdict is the table's; the audit's bound is Clopper-Pearson's; the race picks
the grid's winner and stops at the floor; the expected f evaluations match the counted ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
from evaluation_fixtures import TINY, tiny_estimator
from scipy.stats import beta

from deq_attacks import BackpropThroughSolver, Early, Ensemble, Final
from deq_attacks.data import load_digits
from deq_attacks.evaluation import (
    Attack,
    AttackOutput,
    EvaluationConfig,
    Mode,
    SampleSeeds,
    SweepConfig,
    SweepMode,
    ThreatModel,
    clopper_pearson_upper,
    evaluate_model,
    fixed_step_pgd,
    register_attack,
    run_sweep,
    scoped_attacks,
)
from deq_attacks.evaluation.cost import counting_f, racing_rounds
from deq_attacks.evaluation.distributed import Shards

TARGET = 3
"""The class the one-class attack breaks."""


@dataclass(frozen=True)
class OneClassPGD(Attack):
    """A strong PGD (BPTT, 10 steps of eps/3) on the samples of class ``TARGET`` only; the
    others are returned clean: it breaks samples the weak columns leave robust."""

    label: ClassVar[str] = "one-class"
    uses_estimate: ClassVar[bool] = False

    def run(
        self, model: Any, x: np.ndarray, y: np.ndarray, threat: ThreatModel, seeds: SampleSeeds
    ) -> AttackOutput:
        out = x.copy()
        rows = np.flatnonzero(y == TARGET)
        if len(rows):
            strong = ThreatModel(threat.eps, threat.eps / 3, 10)
            out[rows] = fixed_step_pgd(
                model, BackpropThroughSolver(), x[rows], y[rows], strong, seed=seeds.subset(rows)
            )
        return AttackOutput(out)

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        return {"budget": 10, "class": TARGET}

    def calls(self, threat: ThreatModel, num_classes: int) -> tuple[float, float]:
        return 0.0, 10.0


def weak(**changes: Any) -> EvaluationConfig:
    """A weak protocol (PGD of one small step) beside the one-class column (registered)."""
    settings: dict[str, Any] = dict(
        eps=0.15, step=0.01, steps=1, attacks="pgd,one-class", bptt=False,
        sweep=SweepConfig({"adjoint": {"n": "1", "beta": "1.0"},
                           "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}),
    )  # fmt: skip
    return dataclasses.replace(TINY, **{**settings, **changes})


def _digits(classes_dev: bool, n_dev: int = 16, n_test: int = 24):
    data = load_digits()
    x, y = data.x[1200:], data.y[1200:]
    others = np.flatnonzero(y != TARGET)
    target = np.flatnonzero(y == TARGET)
    dev = np.concatenate([target[:6], others[: n_dev - 6]]) if classes_dev else others[:n_dev]
    rest = np.setdiff1d(np.arange(len(y)), dev)
    test = np.concatenate([np.intersect1d(rest, target)[: n_test // 2],
                           np.intersect1d(rest, others)[: n_test // 2]])  # fmt: skip
    return (x[dev], y[dev]), (x[test], y[test])


def _run(config: EvaluationConfig, dev, test):
    estimator = tiny_estimator(trained=True, batch_invariant=True)
    return evaluate_model(estimator, test, dev, config)


@pytest.mark.parametrize("classes_dev", [True, False], ids=["dev-keeps", "audit-escalates"])
def test_a_column_that_alone_breaks_samples_is_kept_or_escalated(classes_dev: bool) -> None:
    dev, test = _digits(classes_dev)
    with scoped_attacks():
        register_attack("one_class")(OneClassPGD)
        table = _run(weak(), dev, test)
        verdict = _run(weak(mode=Mode.VERDICT, audit_size=3), dev, test)
    # the premise: the one-class column breaks samples no other column breaks
    alone = 0
    for defense, row in table.survived.items():
        others = np.all([v for c, v in row.items() if c != "one-class"], axis=0)
        alone += int((others & ~np.asarray(row["one-class"]) & table.clean[defense]).sum())
    assert alone > 0
    for defense, robust in table.verdict().items():
        np.testing.assert_array_equal(verdict.verdict()[defense], robust, err_msg=defense)
    audits = verdict.audit
    assert set(audits) == {"final", "early", "ensemble"}
    if classes_dev:  # the development split shows the column is needed
        assert all("one-class" in a["kept"] for a in audits.values())
    else:  # the development split has no sample of its class: the audit finds it
        assert all("one-class" in a["skipped"] for a in audits.values())
        assert any("one-class" in a["escalated"] for a in audits.values())
        assert any(a["broke"]["one-class"] > 0 for a in audits.values())
    for a in audits.values():
        assert a["size"] == min(3, a["survivors"])
        expected = 1 - 0.05 ** (1 / a["size"]) if a["unaudited"] else 0.0
        assert a["bound"] == pytest.approx(expected)
    # the interval is widened by the bound on the unaudited survivors
    for r in verdict.robustness():
        plain = next(t for t in table.robustness() if t.defense == r.defense)
        shift = verdict.missed_bound(r.defense) / r.n
        assert r.low == pytest.approx(max(0.0, plain.low - shift))
        assert r.high == plain.high
    saved = verdict.to_json()
    assert saved["settings"]["mode"] == "verdict" and saved["audit"]["final"]["size"] >= 1
    assert "cover" in verdict.timings and "audit" in verdict.timings


@pytest.mark.parametrize("failures,n", [(0, 59), (0, 1), (1, 10), (3, 59), (7, 20), (0, 299)])
def test_the_audit_bound_is_the_clopper_pearson_beta_quantile(failures: int, n: int) -> None:
    assert clopper_pearson_upper(failures, n) == pytest.approx(
        beta.ppf(0.95, failures + 1, n - failures), rel=1e-9, abs=1e-12
    )
    assert clopper_pearson_upper(0, 59) <= 0.05 < clopper_pearson_upper(0, 58)
    assert clopper_pearson_upper(5, 5) == 1.0 and clopper_pearson_upper(0, 0) == 0.0
    with pytest.raises(ValueError, match="failures"):
        clopper_pearson_upper(3, 2)


DEFENSES = {"final": Final(), "early": Early(2), "ensemble": Ensemble()}


def _sweep(mode: SweepMode, eps: float, grid: dict[str, dict[str, str]]):
    data = load_digits()
    x, y = data.x[1200:1232], data.y[1200:1232]
    threat = ThreatModel(eps=eps, step=eps / 2, steps=2)
    estimator = tiny_estimator(trained=True, batch_invariant=True)
    with counting_f(estimator.deq) as counted:
        result = run_sweep(
            estimator, SweepConfig(grid), x, y, threat, DEFENSES, "early", Shards.current(8),
            mode=mode,
        )  # fmt: skip
    return result, counted.total


def test_the_race_picks_the_grids_clear_winner_for_less_work() -> None:
    grid = {"adjoint": {"n": "1,3", "beta": "0.01,0.03,0.1,1.0"},
            "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}  # fmt: skip
    grid_sweep, work_grid = _sweep(SweepMode.GRID, 0.2, grid)
    race_sweep, work_race = _sweep(SweepMode.RACING, 0.2, grid)
    chosen_grid, entries_grid = grid_sweep.chosen, grid_sweep.entries
    chosen_race, entries_race = race_sweep.chosen, race_sweep.entries
    adjoint = sorted(e["accuracy"]["early"] for e in entries_grid if e["family"] == "adjoint")
    assert adjoint[0] + 0.05 < adjoint[1]  # the premise: one candidate is clearly strongest
    assert chosen_race == chosen_grid
    assert work_race < 0.8 * work_grid
    raced = [e for e in entries_race if e["family"] == "adjoint"]
    assert len(raced) == 8 and sum(e["chosen"] for e in raced) == 1
    assert all(e["race"][0]["images"] == 4 for e in raced)  # the first round: an eighth
    winner = next(e for e in raced if e["chosen"])
    assert [r["images"] for r in winner["race"]] == [4, 8, 16, 32]
    assert sum(e["images"] for e in raced) < 8 * 32


def test_the_race_stops_at_the_floor() -> None:
    grid = {"unrolled": {"n": "1,2,3,4", "k": "1", "lam": "1.0"},
            "adjoint": {"n": "1,2", "beta": "1.0"}}  # fmt: skip
    entries = _sweep(SweepMode.RACING, 1.0, grid)[0].entries
    for family in ("unrolled", "adjoint"):
        raced = [e for e in entries if e["family"] == family]
        assert len(raced) == 1 and raced[0]["chosen"]  # the first candidate is at 0%
        assert raced[0]["accuracy"]["early"] == 0.0 and raced[0]["images"] < 32
    assert racing_rounds(5, 32) == [(5, 4), (3, 8), (2, 16), (1, 32)]
    assert racing_rounds(1, 32) == [(1, 32)]


def test_the_expected_cost_is_within_20_percent_of_the_counted_f_evaluations() -> None:
    config = dataclasses.replace(TINY, attacks="pgd", mode=Mode.TABLE, sweep_mode=SweepMode.GRID)
    data = load_digits()
    x, y = data.x[1200:], data.y[1200:]
    estimator = tiny_estimator(trained=True)
    report = evaluate_model(estimator, (x[16:40], y[16:40]), (x[:16], y[:16]), config)
    cost = report.cost_record()
    expected, actual = cost["expected_f_evals"], cost["actual_f_evals"]
    assert set(expected) == {"early_exit", "sweep", "clean", "columns"}
    for step in expected:
        assert actual[step] > 0
        assert abs(expected[step] - actual[step]) <= 0.2 * actual[step], (step, expected, actual)
    assert cost["seconds_per_f"] > 0 and cost["expected_wall_s"] > 0
    assert report.to_json()["cost"]["expected_f_evals"] == expected


def test_a_verdict_report_says_what_the_audit_did_and_plots_the_race(tmp_path) -> None:
    from deq_attacks.evaluation import markdown_report, write_outputs

    dev, test = _digits(False)
    with scoped_attacks():
        register_attack("one_class")(OneClassPGD)
        report = _run(weak(mode=Mode.VERDICT, audit_size=3, sweep_mode=SweepMode.RACING,
                           sweep=SweepConfig({"adjoint": {"n": "1,2", "beta": "1.0"},
                                              "unrolled": {"n": "1", "k": "1", "lam": "1.0"}})),
                      dev, test)  # fmt: skip
    text = markdown_report(report, "verdict")
    assert "Verdict mode, final: kept ready-made PGD" in text
    assert "one-sided 95% Clopper-Pearson" in text and "Cost: expected at most" in text
    assert any("race" in e for e in report.sweep)
    paths = write_outputs(report, tmp_path, "verdict")
    assert paths["sweep"].stat().st_size > 0


def test_the_new_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="audit_size must be an int >= 1"):
        EvaluationConfig(audit_size=0)
    with pytest.raises(TypeError, match="sweep_mode must be a SweepMode"):
        EvaluationConfig(sweep_mode="racing")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="table, cascade or verdict"):
        EvaluationConfig(mode="verdict")  # type: ignore[arg-type]
