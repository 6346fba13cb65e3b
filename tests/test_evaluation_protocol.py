"""The protocol: shared runs, scoring with preprocessing, the sweep, the whole evaluation with
its JSON, resume and fingerprint, and torchrun-style sharding (2 gloo processes)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescent
from evaluation_fixtures import AA, SQUARE, TINY, splits, tiny_deq_weights, tiny_estimator

from deq_attacks import (
    Adjoint,
    Anderson,
    BackpropThroughSolver,
    DEQEstimator,
    Early,
    Ensemble,
    Exact,
    Final,
    FixedPointIteration,
    Phantom,
    PhantomGradient,
    Unrolled,
)
from deq_attacks.evaluation import (
    BPTT,
    READY_MADE,
    EvaluationConfig,
    Mode,
    SampleSeeds,
    SweepConfig,
    ThreatModel,
    evaluate_model,
    fixed_step_pgd,
    markdown_report,
    per_state_accuracy,
    protocol_columns,
    protocol_estimates,
    run_sweep,
    score_readouts,
)
from deq_attacks.evaluation.attacks import FixedStepPGD
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.gradients import estimate_from_spec
from deq_attacks.models import mlp_deq

THREAT = ThreatModel(eps=0.1, step=0.05, steps=2)


def test_fixed_step_pgd_equals_arts_pgd_without_random_start() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    threat = ThreatModel(eps=0.1, step=0.03, steps=3, random_start=False)
    ours = fixed_step_pgd(estimator, Phantom(2, 0.5), x, y, threat)
    with estimator.using(estimate=Phantom(2, 0.5)):
        art = ProjectedGradientDescent(
            estimator, eps=0.1, eps_step=0.03, max_iter=3, num_random_init=0, verbose=False
        ).generate(x, np.eye(10, dtype=np.float32)[y])
    np.testing.assert_allclose(ours, art, atol=1e-6)
    assert np.abs(ours - x).max() > 0.05


def test_shared_run_does_not_depend_on_the_defense_or_the_batch() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    runs = []
    for defense in (Final(), Early(2), Ensemble()):
        with estimator.using(defense=defense):
            runs.append(fixed_step_pgd(estimator, Unrolled(1, 1, 1.0), x, y, THREAT, seed=3))
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    # the random start of sample i depends on (seed, i) only: a batch of samples 4..7
    part = fixed_step_pgd(estimator, Unrolled(1, 1, 1.0), x[4:8], y[4:8], THREAT,
                          seed=SampleSeeds(3, "any column", np.arange(4, 8)))  # fmt: skip
    np.testing.assert_allclose(part, runs[0][4:8], atol=1e-6)
    other = fixed_step_pgd(estimator, Unrolled(1, 1, 1.0), x, y, THREAT, seed=4)
    assert not np.allclose(other, runs[0], atol=1e-3)


def test_scoring_applies_preprocessing_like_predict() -> None:
    estimator = tiny_estimator(trained=True, preprocessing=(0.2, 0.7))
    (x, y), _ = splits()
    scores = score_readouts(estimator, x, y, {"final": Final(), "ens": Ensemble()}, 5)
    for n in (1, 2, 4):
        with estimator.using(defense=Early(n)):
            expected = estimator.predict(x).argmax(1) == y
        np.testing.assert_array_equal(scores.states[:, n - 1], expected)
    np.testing.assert_array_equal(scores.correct["final"], estimator.predict(x).argmax(1) == y)
    with estimator.using(defense=Ensemble()):
        np.testing.assert_array_equal(scores.correct["ens"], estimator.predict(x).argmax(1) == y)
    accuracy, residual = per_state_accuracy(estimator, x, y, 7)
    np.testing.assert_allclose(accuracy, scores.states.mean(0))
    assert residual.shape == (4,) and (residual >= 0).all()
    # without the preprocessing the model would see other inputs (the old bug)
    plain = tiny_estimator(trained=True)
    assert not np.array_equal(plain.predict(x), estimator.predict(x))


def test_sweep_records_every_candidate_and_picks_the_largest_drop() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits(24)
    config = SweepConfig({"adjoint": {"n": "all", "beta": "0.5,1.0"},
                          "unrolled": {"n": "1,3", "k": "1,2", "lam": "1.0"}})  # fmt: skip
    defenses = {"final": Final(), "early": Early(2)}
    said: list[str] = []
    sweep = run_sweep(
        estimator, config, x, y, THREAT, defenses, "early", Shards(), progress=said.append
    )
    chosen, entries, plan = sweep.chosen, sweep.entries, sweep.plan
    assert [p["family"] for p in plan] == ["adjoint", "unrolled"] and all(p["runs"] for p in plan)
    # every candidate reports as it finishes, with its count and early-state accuracy
    assert len(said) == 12 and said[0].startswith("sweep 1/12 Adjoint(")
    last = entries[-1]
    assert said[-1] == f"sweep 12/12 {last['estimate']}: early {last['accuracy']['early']:.1%}"
    # resumed: the stored entries are reported as stored and not run again
    again: list[str] = []
    stored = {e["estimate"]: e for e in entries[:5]}
    rerun = run_sweep(estimator, config, x, y, THREAT, defenses, "early", Shards(),
                      done=stored, progress=again.append)  # fmt: skip
    assert [m.endswith("(stored)") for m in again] == [True] * 5 + [False] * 7
    assert [e["estimate"] for e in rerun.entries] == [e["estimate"] for e in entries]
    assert plan[0]["grid"] == {"n": "all", "beta": "0.5,1.0"}
    assert len(entries) == 4 * 2 + 2 * 2
    for family in ("adjoint", "unrolled"):
        mine = [e for e in entries if e["family"] == family]
        best = min(mine, key=lambda e: e["accuracy"]["early"])
        assert repr(chosen[family]) == best["estimate"]
        assert all(len(e["state_accuracy"]) == 4 for e in mine)
    # the old fixed column Adjoint(n=3, beta=0.5) is in the grid: the choice is never weaker
    fixed = next(e for e in entries if e["estimate"] == repr(Adjoint(n=3, beta=0.5)))
    chosen_entry = next(e for e in entries if e["estimate"] == repr(chosen["adjoint"]))
    assert chosen_entry["accuracy"]["early"] <= fixed["accuracy"]["early"]
    with pytest.raises(ValueError, match="beyond"):
        SweepConfig({"adjoint": {"n": "9"}}).candidates(estimator.deq.solver)
    with pytest.raises(ValueError, match="unrolled.lam"):
        SweepConfig({"unrolled": {"lam": "0,1"}})


def test_columns_are_data_and_extra_estimates_add_columns() -> None:
    chosen = {"adjoint": Adjoint(n=2, beta=0.5), "unrolled": Unrolled(1, 2, 0.5)}
    estimates = protocol_estimates(Phantom(2, 0.5), chosen, {"bptt": Unrolled(4, 1, 1.0)})
    assert list(estimates) == ["ready-made", "exact", "adjoint z_2", "unrolled z_1",
                               "ens. adjoint", "ens. unrolled", "bptt"]  # fmt: skip
    columns = protocol_columns(estimates, TINY)
    assert [c.label for c in columns][-3:] == ["bptt PGD", "bptt AA", "square"]
    assert len(columns) == 2 * len(estimates) + 1


def test_an_estimate_of_the_defended_computation_runs_once_per_defense() -> None:
    assert BackpropThroughSolver().depends_on_defense and not Phantom().depends_on_defense
    assert FixedStepPGD.shared  # one run scores every defense; its column does too ...
    assert not protocol_columns({"bptt": BackpropThroughSolver()}, TINY)[0].shared  # ... not this


def run_tiny(path: Path | None, config: EvaluationConfig = TINY, **kwargs):
    dev, test = splits()
    estimator = tiny_estimator(trained=True, batch_invariant=True)
    return evaluate_model(estimator, test, dev, config, store_path=path, **kwargs)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "store.jsonl"
    return path, run_tiny(path)


def test_whole_protocol_report(tiny_report) -> None:
    path, report = tiny_report
    matrix = report.matrix()
    assert matrix.defenses == ["final", "early", "ensemble"]
    assert len(matrix.columns) == 15 and matrix.n_samples == 16
    assert {"bptt PGD", "bptt AA"} <= set(matrix.columns)
    assert report.defenses["early"] == repr(Early(report.early_exit))
    assert report.development["early_exit"] == report.early_exit
    assert matrix.per_sample_robustness().accuracy <= matrix.paper_robustness().accuracy
    # every estimate as a rebuildable spec, also beside its columns
    assert estimate_from_spec(report.estimates["exact"]) == Exact()
    assert estimate_from_spec(report.estimates["ready-made"]) == Phantom(2, 0.5)
    chosen = [label for label in report.estimates if label.startswith("adjoint z_")]
    assert repr(estimate_from_spec(report.estimates[chosen[0]])) == report.chosen["adjoint"]
    assert report.columns["bptt AA"]["estimate_spec"] == report.estimates["bptt"]
    assert set(report.timings) == {"early_exit", "sweep", "clean", "columns", "measurements"}
    for key, extra in report.extras.items():
        assert key.endswith(" AA") and len(extra["broken_by"]) == 16
        defense, column = key.split("/")
        assert extra["after/square"] == report.survived[defense][column]
    names = {c.name for c in report.diagnostics}
    assert {"square_beats_gradient", "more_steps_lower_accuracy", "large_eps_accuracy",
            "forward_not_converged", "robustness_accumulation", "output_depends_on_batch",
            "randomized_output", "zero_or_nan_gradients", "exact_backward_not_converged",
            "spectral_radius", "gradient_alignment"} <= names  # fmt: skip
    alignment = next(c for c in report.diagnostics if c.name == "gradient_alignment")
    assert set(alignment.numbers) == {"final", "early", "ensemble"}
    for per_defense in alignment.numbers.values():
        assert "bptt" not in per_defense["estimates"] and "ready-made" in per_defense["estimates"]
        for entry in per_defense["estimates"].values():
            assert entry["median"] is None or -1 - 1e-9 <= entry["median"] <= 1 + 1e-9
    assert all(c.verdict in ("pass", "flag") for c in report.diagnostics)
    saved = json.loads(json.dumps(report.to_json()))
    assert saved["columns"]["ready-made AA"]["autoattack"]["standard"] is False
    assert len(saved["sweep"]) == 4
    assert saved["white_box_robustness"]["per_sample"]["n"] == 16


def test_resume_reuses_per_sample_results_and_checks_the_fingerprint(
    tiny_report, monkeypatch
) -> None:
    path, report = tiny_report

    def fail(*args, **kwargs):
        raise AssertionError("a finished step was recomputed")

    forbid_computation(monkeypatch, fail)
    again = run_tiny(path)
    assert again.survived == report.survived and again.early_exit == report.early_exit
    assert json.dumps(again.to_json()["diagnostics"]) == json.dumps(report.to_json()["diagnostics"])
    dev, test = splits()
    # other weights: the fingerprint differs, so nothing is reused
    other = tiny_estimator(trained=True, batch_invariant=True)
    with torch.no_grad():
        next(other.deq.parameters()).add_(1e-3)
    said: list[str] = []
    with pytest.raises(AssertionError, match="recomputed"):
        evaluate_model(other, test, dev, TINY, store_path=path, progress=said.append)
    kept = next(path.parent.glob("store.*.jsonl"))
    assert said[0] == (
        f"starting afresh: {path} held results for other weights; they are kept in {kept}"
    )
    # other data (one test image changed by one grey level): nothing is reused either
    x = test[0].copy()
    x[0, 0, 0, 0] = min(1.0, x[0, 0, 0, 0] + 1 / 255)
    estimator = tiny_estimator(trained=True, batch_invariant=True)
    with pytest.raises(AssertionError, match="recomputed"):
        evaluate_model(estimator, (x, test[1]), dev, TINY, store_path=path)


def forbid_computation(monkeypatch, fail) -> None:
    """Make every attack run, forward scoring and measurement of the protocol call ``fail``."""
    monkeypatch.setattr("deq_attacks.evaluation.distributed.BlockMap.mine", fail)  # every block
    for name in ("batch_outputs", "gradient_health", "exact_backward", "spectral_radii",
                 "alignment"):  # fmt: skip
        monkeypatch.setattr(f"deq_attacks.evaluation.measurements.{name}", fail)


def test_bad_input_is_named_before_work() -> None:
    dev, test = splits()
    estimator = tiny_estimator()
    with pytest.raises(ValueError, match="labels"):
        evaluate_model(estimator, (test[0], test[1] + 20), dev, TINY)
    with pytest.raises(ValueError, match="images"):
        evaluate_model(estimator, (test[0][:, :, :4], test[1]), dev, TINY)


def test_cli_evaluate_on_a_checkpoint(tmp_path: Path, capsys) -> None:
    from deq_attacks.checkpoints import save_weights
    from deq_attacks.cli import main

    weights = save_weights(tiny_estimator(trained=True).deq, tmp_path / "w.safetensors")
    common = ["evaluate", "--model.name", "mlp_deq", "--model.args.in_features", "64",
              "--model.args.num_classes", "10", "--model.args.hidden", "16"]  # fmt: skip
    tiny = ["--model.forward_threshold", "3", "--n-dev", "8", "--n-test", "8", "--steps", "1",
            "--attacks", "pgd,autoattack:iterations=1,queries=3,target_classes=2,square:queries=3",
            "--long_steps", "2", "--batch_size", "8",
            "--diagnostic_samples", "2", "--sweep", "adjoint.n=1", "--sweep", "adjoint.beta=1.0",
            "--sweep", "unrolled.n=1", "--sweep", "unrolled.k=1", "--sweep", "unrolled.lam=1.0",
            "--eps", "0.1", "--step", "0.05", "--mode", "table"]  # fmt: skip
    code = main([*common, "--model.checkpoint", str(weights), *tiny, "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "White-box robustness (paper" in out and "## Diagnostics" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "store.jsonl").exists()
    assert saved["settings"]["config"]["sweep"]["grids"]["adjoint"] == {"n": "1", "beta": "1.0"}
    assert [p["family"] for p in saved["settings"]["sweep_plan"]] == ["adjoint", "unrolled"]
    assert saved["settings"]["fingerprint"]["description"]["model"] == "mlp_deq"
    assert main(["evaluate", "--model.name", "no_such_model", "--out-dir", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main([*common, "--n-test", "100000", "--out-dir", str(tmp_path)]) == 2
    assert "held-out images" in capsys.readouterr().err


def test_early_exit_stops_the_solver_at_n() -> None:
    deq = tiny_estimator(trained=True).deq.eval()
    (x, _), _ = splits()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        early = deq(xt, readout=Early(2))
        short = deq.last_trajectory
        injection = deq.inject(xt)
        full = deq.solve(injection, keep=True)
        expected = deq.logits(full.state(2), injection)
    assert short is not None and short.num_steps == 2 and full.num_steps > 2
    assert short.nfe < full.nfe
    torch.testing.assert_close(early, expected, rtol=0, atol=0)


def test_early_exit_stops_the_attack_paths_solve_unless_a_gradient_is_needed() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    xt = torch.from_numpy(x)
    deq = estimator.deq
    with estimator.using(defense=Early(2)):
        with torch.no_grad():
            short_logits = estimator.model(xt)
        short = deq.last_trajectory
        predicted = estimator.predict(x)
        leaf = xt.clone().requires_grad_()
        full_logits = estimator.model(leaf)
        full = deq.last_trajectory
        full_logits.sum().backward()  # the estimate reads the whole trajectory
    assert short is not None and short.num_steps == 2
    assert full is not None and full.num_steps > 2 and leaf.grad is not None
    torch.testing.assert_close(short_logits, full_logits.detach(), rtol=0, atol=0)
    np.testing.assert_array_equal(predicted, short_logits.numpy())


@pytest.fixture(scope="module")
def cascade_report():
    return run_tiny(None, dataclasses.replace(TINY, mode=Mode.CASCADE))


def test_cascade_gives_the_full_tables_per_sample_verdict(tiny_report, cascade_report) -> None:
    _, table = tiny_report
    cascade = cascade_report
    assert cascade.mode == "cascade" and table.mode == "table"
    for defense, verdict in table.verdict().items():
        np.testing.assert_array_equal(cascade.verdict()[defense], verdict)
    # the verdict of table mode is the matrix's per-sample worst case
    worst = table.matrix().per_sample_worst()
    assert [r.robust for r in worst] == [r.robust for r in table.robustness()]
    # every cell the cascade ran equals the full table's, and it skipped cells
    skipped = 0
    for defense, row in cascade.survived.items():
        for column, values in row.items():
            for i, value in enumerate(values):
                if value is None:
                    skipped += 1
                else:
                    assert value == table.survived[defense][column][i], (defense, column, i)
    assert skipped > 0
    assert set(cascade.columns) == set(table.columns)


def test_column_accuracy_is_the_matrix_by_label(tiny_report, cascade_report) -> None:
    _, report = tiny_report
    accuracy, matrix = report.column_accuracy(), report.matrix()
    assert list(accuracy) == matrix.defenses
    for row, expected in zip(accuracy.values(), matrix.column_accuracy(), strict=True):
        assert list(row) == matrix.columns and list(row.values()) == expected.tolist()
    assert json.loads(json.dumps(report.to_json()))["column_accuracy"] == accuracy
    assert {f"{READY_MADE} PGD", f"{BPTT} PGD"} <= set(accuracy["final"])
    with pytest.raises(ValueError, match="no full matrix"):
        cascade_report.column_accuracy()


def test_cascade_order_and_report(cascade_report) -> None:
    report = cascade_report
    for order in report.order.values():
        assert order[0] == "ready-made PGD" and order[-1] == "square"
        assert sorted(order) == sorted(report.columns)
        assert order.index("bptt AA") < order.index("bptt PGD")  # per-defense PGD after AA
        shared = [c for c in order if c.endswith(" PGD") and c != "bptt PGD"]
        assert order[: len(shared)] == shared  # the shared runs first
    assert all(v is not None for v in report.survived["final"]["ready-made PGD"])
    broken = report.broken_by()
    for defense, verdict in report.verdict().items():
        assert [name == "" for name in broken[defense]] == verdict.tolist()
    with pytest.raises(ValueError, match="no full matrix"):
        report.matrix()
    saved = json.loads(json.dumps(report.to_json()))
    assert saved["column_accuracy"] is None and "paper" not in saved["white_box_robustness"]
    assert saved["settings"]["mode"] == "cascade" and "order" in saved["timings"]
    text = markdown_report(report, "cascade")
    assert "robust per sample [95% CI]" in text and "worst (paper)" not in text
    for key, extra in report.extras.items():  # AutoAttack's extras: None where not attacked
        defense, column = key.split("/")
        for after, value in zip(extra["after/square"], report.survived[defense][column]):
            assert after == value


def test_a_cascade_with_nothing_left_after_the_ready_made_pgd_makes_no_ordering_run(
    tmp_path: Path,
) -> None:
    """At eps 1 the ready-made PGD breaks every sample: the cascade then runs no other
    column and measures no development order (the runs only it would use), and its verdict is
    the full table's."""
    big = dataclasses.replace(TINY, eps=1.0, step=0.5)
    store = tmp_path / "store.jsonl"
    cascade = run_tiny(store, dataclasses.replace(big, mode=Mode.CASCADE))
    assert not any(v.any() for v in cascade.verdict().values())
    assert "order" not in cascade.timings
    assert "strength/" not in store.read_text()
    for row in cascade.survived.values():
        assert all(v is not None for v in row["ready-made PGD"])
        assert all(v is None for c, vs in row.items() if c != "ready-made PGD" for v in vs)
    table = run_tiny(None, big)
    for defense, verdict in table.verdict().items():
        np.testing.assert_array_equal(cascade.verdict()[defense], verdict)


@pytest.mark.parametrize("solver", [Anderson(threshold=4), FixedPointIteration(threshold=4)])
def test_anderson_and_fixed_point_deqs_go_through_the_whole_protocol(solver) -> None:
    """Our DEQ over a solver that keeps no inverse estimate: every column (AutoAttack, Square
    and BPTT included) runs; the adjoint family steps with B = -I and the results say why."""
    deq = mlp_deq(64, 10, hidden=16, solver=solver, training_gradient=PhantomGradient(2, 0.5))
    deq.load_state_dict(tiny_deq_weights())
    estimator = DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=10)
    dev, test = splits(8, 8)
    config = dataclasses.replace(
        TINY, attacks=f"pgd,{AA},{SQUARE}", bptt=True, diagnostic_samples=2,
        sweep=SweepConfig({"adjoint": {"n": "1", "beta": "1.0"},
                           "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}),
    )  # fmt: skip
    report = evaluate_model(estimator, test, dev, config)
    assert {"exact AA", "adjoint z_1 PGD", "bptt PGD", "square"} <= set(report.columns)
    for defense in report.defenses:  # a verdict for every sample in every column
        assert set(report.survived[defense]) == set(report.columns)
        assert all(None not in flags for flags in report.survived[defense].values())
    plan = {p["family"]: p for p in report.settings["sweep_plan"]}
    assert plan["adjoint"]["fixed"] == {"inverse": "negative_identity"}
    assert "keeps no inverse-Jacobian estimate" in plan["adjoint"]["reason"]
    assert report.estimates["adjoint z_1"]["inverse"] == "negative_identity"
    name = type(solver).__name__
    text = markdown_report(report, name)
    assert f"adjoint runs with inverse=negative_identity: {name} keeps no inverse" in text
    assert "AdjointBroyden" in text  # what is left out, and why
