"""gradient_alignment: per-sample cosine of each estimate's input gradient with the true one
(BackpropThroughSolver), on the tiny float64 tanh DEQs of test_through_solver."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from test_through_solver import CLASSES, FEATURES, STEPS, inputs, tanh_deq
from torch import Tensor, nn

from deq_attacks import (
    BackpropThroughSolver,
    Broyden,
    DEQEstimator,
    Early,
    Exact,
    Unrolled,
)
from deq_attacks.evaluation.alignment import cosines, gradient_alignment
from deq_attacks.gradients import BackwardPass, GradientEstimate, input_gradient, loss_cotangent


@dataclass(frozen=True)
class Negated(GradientEstimate):
    """Minus another estimate."""

    inner: GradientEstimate = field(default_factory=Exact)

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        return -self.inner.injection_gradient(backward)


@dataclass(frozen=True)
class Zero(GradientEstimate):
    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        return torch.zeros_like(backward.injection)


def estimator_over(solver: Broyden, gain: float) -> DEQEstimator:
    return DEQEstimator(
        tanh_deq(solver, gain=gain),
        input_shape=(FEATURES,),
        nb_classes=CLASSES,
        clip_values=None,
        defense=Early(2),
    )


def test_cosines_equal_those_of_directly_computed_gradients() -> None:
    estimator = estimator_over(Broyden(threshold=STEPS, tol=0), gain=2.5)
    x, y = inputs(batch=5)
    estimates = {
        "exact": Exact(),
        "unrolled": Unrolled(n=1, k=1),
        "bptt": BackpropThroughSolver(),
        "negated": Negated(BackpropThroughSolver()),
    }
    result = gradient_alignment(estimator, estimates, x.numpy(), y.numpy(), batch_size=2)
    assert result.defense == repr(Early(2))
    assert min(result.residuals) >= 0.05
    cot = loss_cotangent(nn.CrossEntropyLoss(), y)
    true = input_gradient(estimator.deq, BackpropThroughSolver(), x, cot, readout=Early(2))
    for name, estimate in estimates.items():
        grad = input_gradient(estimator.deq, estimate, x, cot, readout=Early(2))
        expected = nn.functional.cosine_similarity(grad, true, dim=1).numpy()
        got = np.array(result.estimates[name].cosines, dtype=np.float64)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        summary = result.estimates[name]
        assert summary.median == pytest.approx(float(np.median(expected)), abs=1e-12)
        assert summary.worst == pytest.approx(float(expected.min()), abs=1e-12)
        assert summary.cosines[summary.worst_samples[0]] == summary.worst
    assert result.estimates["bptt"].worst == pytest.approx(1.0, abs=1e-12)
    assert result.estimates["negated"].median == pytest.approx(-1.0, abs=1e-12)
    assert result.estimates["exact"].worst is not None
    assert result.estimates["exact"].worst < 0.999  # obfuscated on an unconverged model
    # JSON-able, batch size does not matter
    data = json.loads(json.dumps(result.to_json()))
    assert data["estimates"]["bptt"]["cosines"] == pytest.approx([1.0] * 5, abs=1e-12)
    single = gradient_alignment(estimator, estimates, x.numpy(), y.numpy(), batch_size=1)
    np.testing.assert_allclose(
        np.array(single.estimates["exact"].cosines, dtype=np.float64),
        np.array(result.estimates["exact"].cosines, dtype=np.float64),
        rtol=0,
        atol=1e-12,
    )


def test_exact_is_aligned_on_a_converged_model() -> None:
    estimator = estimator_over(Broyden(threshold=40, tol=1e-12), gain=0.6)
    estimator.defense = estimator.deq.readout  # Final
    x, y = inputs(batch=4)
    result = gradient_alignment(
        estimator, {"exact": Exact(Broyden(threshold=60, tol=1e-14))}, x.numpy(), y.numpy()
    )
    assert max(result.residuals) < 1e-10
    assert result.estimates["exact"].worst is not None
    assert result.estimates["exact"].worst > 1 - 1e-10


def test_zero_gradient_has_no_cosine() -> None:
    estimator = estimator_over(Broyden(threshold=STEPS, tol=0), gain=2.5)
    x, y = inputs(batch=3)
    result = gradient_alignment(estimator, {"zero": Zero()}, x.numpy(), y.numpy())
    zero = result.estimates["zero"]
    assert zero.cosines == (None, None, None) and zero.undefined == 3
    assert zero.median is None and zero.worst is None and zero.worst_samples == ()
    assert json.loads(json.dumps(result.to_json()))["estimates"]["zero"]["median"] is None


def test_cosines_helper() -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [1.0, 0.0], [-3.0, -3.0]])
    assert cosines(a, b) == [0.0, None, pytest.approx(-1.0)]


def test_bad_arguments_are_refused() -> None:
    estimator = estimator_over(Broyden(threshold=STEPS, tol=0), gain=2.5)
    x, y = inputs(batch=2)
    xn, yn = x.numpy(), y.numpy()
    with pytest.raises(ValueError, match="empty"):
        gradient_alignment(estimator, {}, xn, yn)
    with pytest.raises(TypeError, match="GradientEstimate"):
        gradient_alignment(estimator, {"bad": "exact"}, xn, yn)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="class indices"):
        gradient_alignment(estimator, {"exact": Exact()}, xn, yn[:1])
    with pytest.raises(ValueError, match="batch_size"):
        gradient_alignment(estimator, {"exact": Exact()}, xn, yn, batch_size=0)
    with pytest.raises(ValueError, match="beyond"):
        gradient_alignment(estimator, {"u": Unrolled(n=STEPS + 1)}, xn, yn)
