"""Verdict mode (the audited cascade), the racing sweep and the cost before the work: a column
that alone breaks some samples is kept by the development split or escalated by the audit, so
the per-sample verdict is the table's; the audit's bound is Clopper-Pearson's; the race picks
the grid's winner and stops at the floor; the expected f evaluations match the counted ones."""

from __future__ import annotations

import dataclasses
import zlib
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
from deq_attacks.evaluation.cost import counting_f, expected_costs, racing_rounds
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.scores import Scores
from deq_attacks.evaluation.sweep import margin_rank_sums, race

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
        eps=0.15, step=0.01, steps=1, attacks="pgd,one-class", bptt=True,
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
        verdict = _run(weak(mode=Mode.VERDICT, audit_size=3, cover_size=None), dev, test)
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


def test_without_a_cover_the_shared_audit_escalates_what_breaks() -> None:
    dev, test = _digits(False)
    with scoped_attacks():
        register_attack("one_class")(OneClassPGD)
        table = _run(weak(), dev, test)
        verdict = _run(weak(mode=Mode.VERDICT, audit_size=4, cover_size=0), dev, test)
    for defense, robust in table.verdict().items():
        np.testing.assert_array_equal(verdict.verdict()[defense], robust, err_msg=defense)
    # no cover, and the strongest column is the yardstick's: no development run, no ordering
    assert verdict.timings["cover"]["f_evals"] == 0 and "order" not in verdict.timings
    # one random order of the test samples: each defense audits its first 4 survivors in it
    order = np.random.default_rng([TINY.seed, zlib.crc32(b"audit")]).permutation(len(test[1]))
    audited = {}
    for defense, a in verdict.audit.items():
        assert a["kept"] == ["ready-made PGD", "bptt PGD"] and a["cover_images"] == 0
        alive = np.asarray(verdict.clean[defense]) & np.all(
            [[v is not False for v in verdict.survived[defense][c]] for c in a["kept"]], axis=0
        )
        assert a["survivors"] == int(alive.sum())
        audited[defense] = sorted(order[alive[order]][:4].tolist())
        assert a["audited"] == audited[defense]
        # a cascade: each audited sample counts once, for the column that broke it first
        row = verdict.survived[defense]
        first_broken = sum(
            any(row[c][i] is False for c in a["skipped"]) for i in a["audited"]
        )  # fmt: skip
        assert a["broken"] == sum(a["broke"].values()) == first_broken
        assert set(a["escalated"]) == {c for c, k in a["broke"].items() if k}
    everywhere = set.intersection(*(set(v) for v in audited.values()))
    assert everywhere  # the premise: the defenses' survivors overlap
    assert all(a["shared"] == len(everywhere & set(a["audited"])) for a in verdict.audit.values())
    assert any("one-class" in a["escalated"] for a in verdict.audit.values())


def test_the_cover_size_is_checked_and_cuts_the_expected_cover() -> None:
    with pytest.raises(ValueError, match="cover_size must be an int >= 0 or None"):
        EvaluationConfig(cover_size=-1)
    with pytest.raises(ValueError, match="cover_size must be an int >= 0 or None"):
        EvaluationConfig(cover_size=True)  # type: ignore[arg-type]
    data = load_digits()
    dev = data.x[1200:1216], data.y[1200:1216]
    estimator = tiny_estimator(trained=True)
    columns = {
        size: expected_costs(
            estimator, weak(attacks="pgd", mode=Mode.VERDICT, cover_size=size), dev, 24
        )["steps"]["columns"]
        for size in (None, 8, 0)
    }
    per_image = (columns[None] - columns[0]) / 16
    assert per_image > 0 and columns[8] == pytest.approx(columns[0] + 8 * per_image)
    # only shared columns (PGD, no BPTT): the ready-made PGD is the strongest kept
    config = weak(attacks="pgd", bptt=False, mode=Mode.VERDICT, audit_size=2, cover_size=4)
    report = evaluate_model(estimator, (data.x[1216:1228], data.y[1216:1228]), dev, config)
    assert all(a["kept"][0] == "ready-made PGD" for a in report.audit.values())
    assert all(a["cover_images"] == 4 for a in report.audit.values())


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
    # every round halves, ties on accuracy broken by the margin rank sums: 8, 4, 2, 1
    for number, alive in enumerate([8, 4, 2, 1]):
        assert sum(len(e["race"]) > number for e in raced) == alive
    assert sum(e["images"] for e in raced) == 8 * 4 + 4 * 4 + 2 * 8 + 16
    for e in raced:
        for r in e["race"][:-1]:
            assert r["goes_on"]
        if not e["chosen"]:
            assert e["race"][-1]["goes_on"] is False and e["race"][-1]["margin_rank_sum"] > 0


def test_the_race_breaks_accuracy_ties_by_the_margin_rank_sums() -> None:
    # three candidates on three images: A and B tie on accuracy, A's margins are lower
    a, b, c = np.array([-1.0, 0.5, 2.0]), np.array([-0.5, 1.0, 3.0]), np.array([1.0, -np.inf, 0.1])
    np.testing.assert_allclose(margin_rank_sums([a, b, c]), [1 + 2 + 2, 2 + 3 + 3, 3 + 1 + 1])
    np.testing.assert_allclose(margin_rank_sums([a, a]), [4.5, 4.5])  # equal: the mean rank, 1.5
    accuracy = {"A": 1 / 3, "B": 1 / 3, "C": 1 / 3, "D": 2 / 3}
    margins = {"A": a, "B": b, "C": c, "D": np.array([2.0, 2.0, 2.0])}
    rounds = {"A": [], "B": [], "C": [], "D": []}

    def score(name: str, indices: np.ndarray) -> Scores:
        rounds[name].append(len(indices))
        right = np.arange(3) < round(3 * accuracy[name])
        return Scores({"early": right[indices]}, margins={"early": margins[name][indices]})

    entries, pick = race(list("ABCD"), 3, "early", score, lambda e, s: {"estimate": e})
    # image 0: all four right; the lowest margins (A -1.0, B -0.5) go on; images 0-1: A and
    # B both 50%, A's margins lower: A alone goes on
    assert rounds == {"A": [1, 1, 1], "B": [1, 1], "C": [1], "D": [1]}
    b_race = next(e for e in entries if e["estimate"] == "B")["race"]
    assert b_race[-1]["goes_on"] is False and b_race[-1]["accuracy"] == 0.5
    assert pick == 0 and [e["estimate"] for e in entries if e["chosen"]] == ["A"]


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


def test_the_expected_race_follows_the_halving_schedule() -> None:
    data = load_digits()
    dev = data.x[1200:1216], data.y[1200:1216]
    estimator = tiny_estimator(trained=True)
    sweep = SweepConfig({"adjoint": {"n": "1,2,3,4", "beta": "1.0"},
                         "unrolled": {"n": "1,2", "k": "1", "lam": "1.0"}})  # fmt: skip
    out = {}
    for mode in (SweepMode.GRID, SweepMode.RACING):
        config = dataclasses.replace(TINY, attacks="pgd", sweep=sweep, sweep_mode=mode)
        out[mode] = expected_costs(estimator, config, dev, 24)
    units = out[SweepMode.GRID]["units"]
    candidates = config.sweep.candidates(estimator.deq.solver)
    pgd = {f: [TINY.steps * units[repr(c)][1] + units[repr(c)][0] for c in candidates[f]]
           for f in ("adjoint", "unrolled")}  # fmt: skip
    assert out[SweepMode.GRID]["steps"]["sweep"] == pytest.approx(16 * sum(map(sum, pgd.values())))
    # 4 candidates: 4 on 4 images, 2 on 4 more, 1 on the last 8 (32 candidate-images of the
    # grid's 64); 2 candidates: 2 on 8, 1 on 8 more (24 of 32); at the costliest's price
    race = 32 * max(pgd["adjoint"]) + 24 * max(pgd["unrolled"])
    assert out[SweepMode.RACING]["steps"]["sweep"] == pytest.approx(race)


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


def test_the_shared_solve_probe_counts_what_each_estimate_costs_alone() -> None:
    """The cost probe shares one forward solve among the estimates' backwards: per estimate it
    counts exactly the f evaluations of a fresh ``predict`` and ``loss_gradient`` on its own."""
    from deq_attacks import (
        AdjointBroyden,
        Exact,
        GradientEnsemble,
        Phantom,
        Unrolled,
    )
    from deq_attacks.evaluation.cost import UnitCostProbe
    from deq_attacks.gradients import Adjoint

    data = load_digits()
    x, y = data.x[1200:1202], data.y[1200:1202]
    estimator = tiny_estimator(trained=True)
    estimates = [
        None, Exact(), Phantom(2, 0.5), Unrolled(n=2, k=1), Adjoint(n=3, beta=0.5),
        GradientEnsemble(of=Unrolled(n=None, k=1)), AdjointBroyden(),
        BackpropThroughSolver(), GradientEnsemble(of=Adjoint(n=None, beta=0.5)),
    ]  # fmt: skip
    probe = UnitCostProbe(estimator, x, y)
    for estimate in estimates:
        view = estimator.view(estimate=estimate, defense=Final())
        with counting_f(estimator.deq) as forward:
            view.predict(x)
        alone = 0
        if estimate is not None:
            with counting_f(estimator.deq) as gradient:
                view.loss_gradient(x, y)
            alone = gradient.total
        counted = probe(estimate)
        assert (counted.forward, counted.gradient) == (forward.total / 2, alone / 2), estimate
        assert counted.forward > 0 and (estimate is None or counted.gradient >= counted.forward)
    assert len(probe.counted()) == len(estimates)
