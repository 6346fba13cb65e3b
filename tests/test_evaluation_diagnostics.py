"""The diagnostics' verdicts on hand-made numbers and on the measurements of a tiny trained DEQ
(the checks judge numbers; ``measurements`` computes them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_fixtures import splits, tiny_estimator

from deq_attacks import Broyden, Exact, Phantom
from deq_attacks.adversarial import DefendedModel
from deq_attacks.evaluation import diagnostics as diag
from deq_attacks.evaluation import measurements


def test_square_check_flags_only_a_beaten_defense() -> None:
    accuracy = {
        "final": {"pgd": 0.50, "aa": 0.45, "square": 0.40},
        "early": {"pgd": 0.50, "aa": 0.45, "square": 0.449},  # within the 0.2-point margin
    }
    check = diag.square_check(accuracy, "square")
    assert check.verdict == "flag" and list(check.numbers["defenses"]) == ["final"]
    accuracy["final"]["square"] = 0.46
    assert diag.square_check(accuracy, "square").verdict == "pass"


def test_more_steps_large_eps_accumulation_and_convergence_checks() -> None:
    short = {"final": np.array([1, 0, 0, 1], bool)}
    long = {"final": np.array([1, 1, 0, 1], bool)}
    check = diag.more_steps_check(short, long, (10, 100))
    assert check.verdict == "flag" and check.numbers["final"]["survive_long_only"] == 1
    assert diag.more_steps_check(long, short, (10, 100)).verdict == "pass"
    assert diag.large_eps_check({"final": np.array([0, 0, 1], bool)}, 0.5).verdict == "flag"
    assert diag.large_eps_check({"final": np.zeros(30, bool)}, 0.5).verdict == "pass"
    states = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], bool)  # z_1 2/3 vs z_3 1/3
    assert diag.accumulation_check(states).verdict == "flag"
    assert diag.accumulation_check(states[:, ::-1]).verdict == "pass"
    check = diag.forward_convergence_check(np.array([0.01, 0.2, 0.04, 0.06]))
    assert check.verdict == "flag" and check.numbers["samples"] == [1, 3]


def test_exact_backward_check_flags_unconverged_samples() -> None:
    model = DefendedModel.of(tiny_estimator(trained=True))
    (x, y), _ = splits(8)
    good = diag.exact_backward_check(measurements.exact_backward(model, Exact(), x, y))
    assert good.verdict == "pass"
    assert max(good.numbers["backward_residual"]) <= diag.BACKWARD_RESIDUAL_LIMIT
    assert min(good.numbers["scale_cosine"]) > 0.999
    # one backward iterate cannot solve the adjoint system: every sample is named
    one_step = Exact(Broyden(threshold=1, tol=0.0))
    bad = diag.exact_backward_check(measurements.exact_backward(model, one_step, x, y))
    assert bad.verdict == "flag"
    residual = np.array(bad.numbers["backward_residual"])
    assert bad.numbers["arbitrary_samples"] == np.flatnonzero(residual > 0.05).tolist()
    assert len(bad.numbers["arbitrary_samples"]) > 0


def test_batch_randomness_gradient_and_spectral_checks_pass_on_a_plain_deq() -> None:
    model = DefendedModel.of(tiny_estimator(trained=True))
    (x, y), _ = splits(6)
    batch, random = diag.batch_and_randomness_check(measurements.batch_outputs(model, x, 6))
    assert batch.verdict == "pass" and random.verdict == "pass"
    assert batch.numbers["tolerance"] == diag.BATCH_TOLERANCE["cpu"] == 1e-4
    assert batch.numbers["relative_difference"] <= 1e-4
    numbers = measurements.gradient_health(model, {"phantom": Phantom(2, 0.5)}, x, y)
    health = diag.gradient_health_check(numbers)
    assert health.verdict == "pass" and health.numbers["phantom"] == {"zero": [], "not_finite": []}


def test_spectral_radius_matches_the_dense_jacobian() -> None:
    estimator = tiny_estimator(trained=True)
    deq = estimator.deq
    (x, _), _ = splits(6)
    model = DefendedModel.of(estimator)
    rho = measurements.spectral_radii(model, x, iterations=100)
    np.testing.assert_array_equal(rho, measurements.spectral_radii(model, x, iterations=100))
    with torch.no_grad():
        injection = deq.inject(torch.from_numpy(x))
        z_star = deq.solve(injection).final
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(
            lambda z, i=i: deq.step(z[None], injection[i : i + 1])[0], z_star[i]
        )
        exact = np.abs(np.linalg.eigvals(jacobian.numpy())).max()
        assert rho[i] == pytest.approx(exact, rel=1e-3)


def test_checks_judge_hand_made_measurements() -> None:
    numbers = {"backward_residual": [0.01, 0.2, 0.0], "scale_cosine": [1.0, 1.0, 0.5]}
    check = diag.exact_backward_check(numbers)
    assert check.verdict == "flag" and check.numbers["arbitrary_samples"] == [1, 2]
    assert diag.spectral_radius_check(np.array([0.5, 0.9])).verdict == "pass"
    assert diag.spectral_radius_check(np.array([0.5, 1.2])).verdict == "flag"
    batch = {"relative_difference": 3e-4, "prediction_changes": 0, "repeat_difference": 0.0,
             "samples": 4, "device": "cpu"}  # fmt: skip
    assert diag.batch_and_randomness_check(batch)[0].verdict == "flag"
    assert diag.batch_and_randomness_check({**batch, "device": "cuda"})[0].verdict == "pass"
    health = diag.gradient_health_check({"a": {"zero": [], "not_finite": [3]}})
    assert health.verdict == "flag"
    assert diag.precision_check({"final": 0.5}, {"final": 0.51}, "c").verdict == "pass"
    assert diag.precision_check({"final": 0.5}, {"final": 0.55}, "c").verdict == "flag"
    square = diag.square_first_check({"final": 0, "early": 3}, {"final": 5, "early": 2}, 100)
    assert square.verdict == "flag" and "early 3 of 100" in square.message
    assert diag.square_first_check({"final": 0}, {"final": 5}, 100).verdict == "pass"
