"""The indicators of attack failure (Pintor et al. 2022), Carlini et al.'s random-noise baseline
and AutoAttack's dynamic-defense check: a model built to trip each one trips it, and the sound
tiny DEQ trips none."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import torch
from evaluation_fixtures import TINY, TRANSFER, splits, tiny_estimator
from test_evaluation_eot import _linear_weights
from torch import Tensor, nn

from deq_attacks import DEQ, DEQEstimator, FixedPointIteration
from deq_attacks.adversarial import DefendedModel
from deq_attacks.data import load_digits
from deq_attacks.evaluation import SampleSeeds, ThreatModel, evaluate_model, measurements
from deq_attacks.evaluation import diagnostics as diag

INDICATORS = ("silent_success", "incomplete_optimisation", "unstable_predictions",
              "random_noise_baseline", "transfer_beats_white_box", "dynamic_defense",
              "large_eps_accuracy")  # fmt: skip


def digits(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.x[1200 : 1200 + n], data.y[1200 : 1200 + n]


def logistic() -> nn.Linear:
    """A logistic regression on 600 digits (92% on held-out ones)."""
    linear = nn.Linear(64, 10)
    linear.load_state_dict(_linear_weights())
    return linear


class Logistic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = logistic()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class Bands(Logistic):
    """The logistic regression plus ``b sin(k x.v_c / 8)`` per class: bands of the input space
    where another class wins, and a gradient the sines dominate."""

    def __init__(self, b: float, k: float) -> None:
        super().__init__()
        self.register_buffer("v", torch.randn(64, 10, generator=torch.Generator().manual_seed(1)))
        self.b, self.k = b, k

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        return self.linear(flat) + self.b * torch.sin(self.k * (flat @ self.v) / 8)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        return -grad


class Reversed(Logistic):
    """The logistic regression with its input gradient reversed: every gradient attack climbs
    towards more confidence."""

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(_Reverse.apply(x).flatten(1))


class ReversedBands(Bands):
    """``Bands`` with its input gradient reversed: uniform noise moves the sines, every
    gradient attack climbs towards more confidence."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_Reverse.apply(x))


class InnerSteps(Logistic):
    """A test-time defense: one signed-gradient step on the input that lowers the prediction's
    entropy, inside the forward (a dynamic defense)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            p = self.linear(leaf.flatten(1)).softmax(1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum()
            (grad,) = torch.autograd.grad(entropy, leaf)
        return self.linear((x - 0.01 * grad.sign()).flatten(1))


class Copy(nn.Module):
    """f(z; inj) = inj: the DEQ's answer is its injection (one step)."""

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return inj + 0 * z


def as_deq(logits: nn.Module) -> DEQEstimator:
    """A DEQ whose logits are ``logits(x)``: injection ``logits``, f copies it, identity head."""
    deq = DEQ(Copy(), logits, nn.Identity(), solver=FixedPointIteration(threshold=4, tol=0.0),
              input_shape=(1, 8, 8))  # fmt: skip
    return DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=10)


def path_of(estimator: DEQEstimator, threat: ThreatModel, steps: int = 50) -> dict:
    x, y = digits()
    seeds = SampleSeeds.first(0, "pgd", len(x))
    model = DefendedModel.of(estimator)
    return measurements.attack_path(model, model.estimate, x, y, threat, steps, seeds)


THREAT = ThreatModel(eps=0.1, step=0.025, steps=10)


def test_a_sound_tiny_deq_trips_no_indicator() -> None:
    config = dataclasses.replace(TINY, step=0.025, steps=10, attacks=f"pgd,{TRANSFER}",
                                 bptt=False, long_steps=30)  # fmt: skip
    dev, test = splits(n_dev=8, n_test=16)
    report = evaluate_model(tiny_estimator(trained=True), test, dev, config)
    checks = {c.name: c for c in report.diagnostics}
    assert set(INDICATORS) <= set(checks)
    for name in INDICATORS:
        assert checks[name].verdict == "pass", checks[name].message
    assert checks["dynamic_defense"].numbers["calls"] == {"grad": 0, "backward": 0,
                                                          "_make_grads": 0}  # fmt: skip
    noise = checks["random_noise_baseline"].numbers["final"]
    assert noise["noise_accuracy"] > noise["attack_accuracy"]
    # the sound plain models trip no path, noise or dynamic indicator either
    for model in (tiny_estimator(trained=True), as_deq(Logistic())):
        path = path_of(model, THREAT)
        assert diag.silent_success_check(path, {}).verdict == "pass"
        assert diag.incomplete_optimisation_check(path).verdict == "pass"
        x, _ = digits()
        defended = DefendedModel.of(model)
        seeds = SampleSeeds.first(0, "u", 32)
        unstable = measurements.unstable_predictions(defended, x, 0.001, seeds)
        assert diag.unstable_predictions_check(unstable).verdict == "pass"
        assert diag.dynamic_defense_check(measurements.dynamic_calls(defended, x)).verdict == "pass"


def test_silent_success_trips_on_predictions_that_oscillate_along_the_path() -> None:
    check = diag.silent_success_check(path_of(as_deq(Bands(3.0, 50.0)), THREAT), {})
    assert check.verdict == "flag" and len(check.numbers["path_samples"]) >= 2
    correct = np.asarray(path_of(as_deq(Bands(3.0, 50.0)), THREAT)["correct"])
    for i in check.numbers["path_samples"]:
        assert correct[i, -1] and not correct[i].all()
    # an attack's own verdict that the scoring contradicts trips it too
    fine = {"correct": [[True, True]], "loss": [[0.0, 1.0]]}
    contradicted = {"final/exact AA": {"reported_broken_scored_correct": [3],
                                       "reported_robust_scored_wrong": []}}  # fmt: skip
    assert diag.silent_success_check(fine, contradicted).verdict == "flag"
    agreed = {"final/exact AA": {"reported_broken_scored_correct": [],
                                 "reported_robust_scored_wrong": []}}  # fmt: skip
    assert diag.silent_success_check(fine, agreed).verdict == "pass"


def test_incomplete_optimisation_trips_when_the_steps_are_too_small() -> None:
    tiny_steps = ThreatModel(eps=0.1, step=0.001, steps=10)
    check = diag.incomplete_optimisation_check(path_of(tiny_estimator(trained=True), tiny_steps))
    assert check.verdict == "flag" and len(check.numbers["samples"]) >= 5


def test_unstable_predictions_trip_on_a_shattered_output() -> None:
    x, _ = digits()
    numbers = measurements.unstable_predictions(
        DefendedModel.of(as_deq(Bands(5.0, 20000.0))), x, 0.001, SampleSeeds.first(0, "u", len(x))
    )
    check = diag.unstable_predictions_check(numbers)
    assert check.verdict == "flag" and len(check.numbers["samples"]) >= 3


def test_the_random_noise_baseline_trips_on_a_reversed_gradient() -> None:
    """Every white-box gradient climbs away from the boundary: uniform noise at the eps breaks
    samples that every PGD column left correct."""
    config = dataclasses.replace(TINY, step=0.025, steps=10, attacks="pgd", bptt=False,
                                 long_steps=11)  # fmt: skip
    report = evaluate_model(as_deq(ReversedBands(20.0, 32.0)), digits(32), digits(8), config)
    noise = next(c for c in report.diagnostics if c.name == "random_noise_baseline")
    assert noise.verdict == "flag" and len(noise.numbers["final"]["broken_by_noise_only"]) >= 2
    assert noise.numbers["final"]["attack_accuracy"] >= 0.7  # the attacks barely moved it


def test_transfer_beats_white_box_trips_on_a_reversed_gradient() -> None:
    """A transfer attack from the plain logistic regression breaks what the reversed white-box
    gradients cannot."""
    module = types.ModuleType("indicator_surrogates")
    module.logistic = Logistic()  # type: ignore[attr-defined]
    sys.modules["indicator_surrogates"] = module
    try:
        config = dataclasses.replace(
            TINY, eps=0.3, step=0.1, bptt=False, long_steps=5,
            attacks=f"pgd,{TRANSFER},surrogate=indicator_surrogates:logistic",
        )  # fmt: skip
        report = evaluate_model(as_deq(Reversed()), digits(32), digits(8), config)
    finally:
        del sys.modules["indicator_surrogates"]
    checks = {c.name: c for c in report.diagnostics}
    assert checks["transfer_beats_white_box"].verdict == "flag"
    assert len(checks["transfer_beats_white_box"].numbers["final"]) >= 5
    assert checks["large_eps_accuracy"].verdict == "flag"  # the unconstrained attack fails too


def test_the_dynamic_defense_check_trips_on_gradient_steps_inside_the_forward() -> None:
    x, _ = digits(8)
    numbers = measurements.dynamic_calls(DefendedModel.of(as_deq(InnerSteps())), x)
    check = diag.dynamic_defense_check(numbers)
    assert check.verdict == "flag" and numbers["calls"]["grad"] >= 1
    # pyautoattack's counters are reset: the next plain model is not flagged
    plain = measurements.dynamic_calls(DefendedModel.of(as_deq(Logistic())), x)
    assert diag.dynamic_defense_check(plain).verdict == "pass"
