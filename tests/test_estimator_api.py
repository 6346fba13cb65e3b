"""Tests of the attack-facing API: DEQEstimator's loss-aware and autograd gradients, switching
the estimate and the defense on a live estimator, and the errors a user gets.

The model is a tiny float64 tanh DEQ ``z = tanh(W z + U x + b)``, ``logits = V z + c``, built
from a fixed seed; x has 6 features, the state 10, and there are 4 classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deq_attacks import (
    DEQ,
    Adjoint,
    AdjointBroyden,
    Anderson,
    Broyden,
    DEQEstimator,
    Early,
    Ensemble,
    Exact,
    Final,
    FixedPointIteration,
    GradientEnsemble,
    ImplicitGradient,
    InverseEstimate,
    Phantom,
    Unrolled,
)
from deq_attacks.deq.readout import Readout
from deq_attacks.gradients import (
    GradientEstimate,
    constant_cotangent,
    input_gradient,
    loss_cotangent,
)
from deq_attacks.solvers import Solver

FEATURES, DIM, CLASSES, BATCH = 6, 10, 4, 3

ESTIMATES: list[GradientEstimate] = [
    Exact(),
    Phantom(k=3, lam=0.5),
    Unrolled(n=2, k=2, lam=0.5),
    Unrolled(),
    Adjoint(),
    Adjoint(n=3, beta=0.9, transpose=False),
    Adjoint(n=5, inverse=InverseEstimate.NEGATIVE_IDENTITY),
    AdjointBroyden(),
    AdjointBroyden(n=4),
    GradientEnsemble(Adjoint()),
    GradientEnsemble(Unrolled(k=1, lam=1.0)),
    GradientEnsemble(AdjointBroyden()),
]


class TanhLayer(nn.Module):
    """``f(z, inj) = tanh(z W^T + inj)`` on (B, d) states."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(z @ self.weight.T + inj)


def tanh_deq(solver: Solver | None = None, **deq_kwargs: Any) -> DEQ:
    """A contractive float64 tanh DEQ (||W||_2 = 0.8), the same for every test."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weight = torch.randn(DIM, DIM, dtype=torch.float64)
        weight = 0.8 * weight / torch.linalg.matrix_norm(weight, ord=2)
        injection = nn.Linear(FEATURES, DIM).double()
        with torch.no_grad():
            injection.weight.mul_(3.0)  # a non-trivial trajectory: residual ~1e-3 at step 8
        head = nn.Linear(DIM, CLASSES).double()
    return DEQ(
        TanhLayer(weight), injection, head, solver=solver or Broyden(threshold=8), **deq_kwargs
    )


def estimator(deq: DEQ, **kwargs: Any) -> DEQEstimator:
    return DEQEstimator(deq, input_shape=(FEATURES,), nb_classes=CLASSES, **kwargs)


def batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (BATCH, FEATURES) float64 in [0, 1] and index labels (BATCH,)."""
    rng = np.random.default_rng(seed)
    return rng.random((BATCH, FEATURES)), np.array([0, 2, 3])


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(CLASSES)[labels]


def loss_aware_reference(
    deq: DEQ, estimate: GradientEstimate, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """dL/dx by ``input_gradient`` with ART's loss (mean cross-entropy) at each surrogate state."""
    cotangent = loss_cotangent(nn.CrossEntropyLoss(), torch.from_numpy(y))
    return input_gradient(deq, estimate, torch.from_numpy(x), cotangent).numpy()


@pytest.fixture
def deq() -> DEQ:
    return tanh_deq()


# --- the loss-aware consumer ----------------------------------------------------------------


@pytest.mark.parametrize("estimate", ESTIMATES, ids=repr)
def test_loss_gradient_is_loss_aware_input_gradient(deq: DEQ, estimate: GradientEstimate) -> None:
    est = estimator(deq, estimate=estimate)
    x, y = batch()
    grad = est.loss_gradient(x, one_hot(y))
    assert isinstance(grad, np.ndarray) and grad.shape == x.shape
    reference = loss_aware_reference(deq, estimate, x, y)
    np.testing.assert_allclose(grad, reference, rtol=1e-12, atol=1e-15)
    assert np.abs(grad).max() > 1e-4
    assert est.white_box.backward_calls == 1  # the estimate ran once, through the module


def test_loss_aware_differs_from_straight_through(deq: DEQ) -> None:
    """For an estimate evaluated at an intermediate state, the loss-aware path takes the loss at
    z_n, not at the defended output: the two gradients differ."""
    estimate = Unrolled(n=1, k=1)
    x, y = batch()
    loss_aware = estimator(deq, estimate=estimate).loss_gradient(x, one_hot(y))
    with torch.no_grad():
        probs = torch.softmax(deq(torch.from_numpy(x)), dim=-1)
    straight = (probs - torch.from_numpy(one_hot(y))) / BATCH  # d mean-CE / d defended logits
    autograd = input_gradient(deq, estimate, torch.from_numpy(x), constant_cotangent(straight))
    assert np.abs(loss_aware - autograd.numpy()).max() > 1e-3 * np.abs(loss_aware).max()


def test_exact_loss_gradient_equals_autograd_through_converged_deq() -> None:
    """Exact on a converged DEQ = plain autograd of CE(deq(x), y) through the implicit
    training gradient (a different code path: a hook on f(z*) in DEQ.forward)."""
    tight = Broyden(threshold=40, tol=1e-12)
    deq = tanh_deq(tight, training_gradient=ImplicitGradient(backward_solver=tight)).eval()
    est = estimator(deq, estimate=Exact(backward_solver=tight))
    x, y = batch()
    grad = est.loss_gradient(x, one_hot(y))
    assert deq.last_trajectory is not None
    assert deq.last_trajectory.converged.all()

    x_leaf = torch.from_numpy(x).requires_grad_()
    nn.functional.cross_entropy(deq(x_leaf), torch.from_numpy(y)).backward()
    assert x_leaf.grad is not None
    np.testing.assert_allclose(grad, x_leaf.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "estimate", [Exact(), Adjoint(), Unrolled(n=2, k=2), GradientEnsemble(Adjoint())], ids=repr
)
def test_class_gradient_is_constant_cotangent(deq: DEQ, estimate: GradientEstimate) -> None:
    """ART's class_gradient differentiates the module: the estimate gets the one-hot cotangent
    straight-through, for one class and for every class."""
    est = estimator(deq, estimate=estimate)
    x, _ = batch()
    references = []
    for c in range(CLASSES):
        cotangent = torch.zeros(BATCH, CLASSES, dtype=torch.float64)
        cotangent[:, c] = 1.0
        references.append(
            input_gradient(deq, estimate, torch.from_numpy(x), constant_cotangent(cotangent))
        )
    single = est.class_gradient(x, label=2)
    assert single.shape == (BATCH, 1, FEATURES)
    np.testing.assert_allclose(single[:, 0], references[2].numpy(), rtol=1e-12, atol=1e-15)
    every = est.class_gradient(x)
    assert every.shape == (BATCH, CLASSES, FEATURES)
    np.testing.assert_allclose(
        every, torch.stack(references, dim=1).numpy(), rtol=1e-12, atol=1e-15
    )


def test_numpy_in_numpy_out_torch_in_torch_out(deq: DEQ) -> None:
    est = estimator(deq, estimate=Adjoint())
    x, y = batch()
    from_numpy = est.loss_gradient(x, one_hot(y))
    from_torch = est.loss_gradient(torch.from_numpy(x), torch.from_numpy(one_hot(y)))
    assert isinstance(from_numpy, np.ndarray)
    assert isinstance(from_torch, torch.Tensor)
    np.testing.assert_allclose(from_torch.numpy(), from_numpy, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_index_labels_equal_one_hot_labels(deq: DEQ, kind: str) -> None:
    est = estimator(deq, estimate=Adjoint())
    x, y = batch()
    with_one_hot = est.loss_gradient(x, one_hot(y))
    labels = y if kind == "numpy" else torch.from_numpy(y)
    inputs = x if kind == "numpy" else torch.from_numpy(x)
    with_index = est.loss_gradient(inputs, labels)
    np.testing.assert_allclose(np.asarray(with_index), with_one_hot, rtol=1e-12, atol=1e-15)


# --- switching on a live estimator ----------------------------------------------------------


def test_estimate_setter_and_using_switch_the_gradient(deq: DEQ) -> None:
    est = estimator(deq)  # default Exact()
    x, y = batch()
    labels = one_hot(y)

    def fresh(estimate: GradientEstimate) -> np.ndarray:
        return np.asarray(estimator(tanh_deq(), estimate=estimate).loss_gradient(x, labels))

    exact = est.loss_gradient(x, labels)
    assert est.gradient_estimate == Exact()
    np.testing.assert_allclose(exact, fresh(Exact()), rtol=1e-12, atol=1e-15)

    est.gradient_estimate = Unrolled(n=1, k=1)
    unrolled = est.loss_gradient(x, labels)
    np.testing.assert_allclose(unrolled, fresh(Unrolled(n=1, k=1)), rtol=1e-12, atol=1e-15)
    assert np.abs(unrolled - exact).max() > 1e-3 * np.abs(exact).max()

    with est.using(estimate=Adjoint(n=3)) as inside:
        assert inside is est and est.gradient_estimate == Adjoint(n=3)
        assert est.white_box.estimate == Adjoint(n=3)
        adjoint = est.loss_gradient(x, labels)
    np.testing.assert_allclose(adjoint, fresh(Adjoint(n=3)), rtol=1e-12, atol=1e-15)
    assert np.abs(adjoint - unrolled).max() > 1e-3 * np.abs(unrolled).max()
    assert est.gradient_estimate == Unrolled(n=1, k=1)
    np.testing.assert_allclose(est.loss_gradient(x, labels), unrolled, rtol=1e-12, atol=1e-15)


def test_using_restores_estimate_and_defense_when_the_body_raises(deq: DEQ) -> None:
    est = estimator(deq, estimate=Phantom(), defense=Early(3))
    with (
        pytest.raises(RuntimeError, match="inside"),
        est.using(estimate=Adjoint(n=2), defense=Ensemble()),
    ):
        assert est.gradient_estimate == Adjoint(n=2) and est.defense == Ensemble()
        raise RuntimeError("inside")
    assert est.gradient_estimate == Phantom()
    assert est.defense == Early(3)
    # nested: each level restores its own
    with est.using(defense=Final()):
        with est.using(estimate=Exact(), defense=Ensemble()):
            assert est.defense == Ensemble()
        assert est.defense == Final() and est.gradient_estimate == Phantom()
    assert est.defense == Early(3)


def test_using_with_a_refused_switch_changes_nothing(deq: DEQ) -> None:
    est = estimator(deq, estimate=Phantom())
    with pytest.raises(ValueError, match="beyond"), est.using(Adjoint(n=2), Early(99)):
        pass
    assert est.gradient_estimate == Phantom()


def test_predict_follows_the_defense(deq: DEQ) -> None:
    est = estimator(deq)
    x, _ = batch()
    x_t = torch.from_numpy(x)
    readouts: list[Readout] = [Final(), Early(1), Ensemble()]
    outputs = []
    for readout in readouts:
        est.defense = readout
        assert est.defense == readout
        predicted = est.predict(x)
        with torch.no_grad():
            expected = deq(x_t, readout).numpy()
        np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)  # ART -> float32
        with est.using(defense=Final()), torch.no_grad():
            np.testing.assert_allclose(est.predict(x), deq(x_t).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(est.predict(x), predicted, rtol=0, atol=0)  # restored
        outputs.append(predicted)
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert np.abs(outputs[i] - outputs[j]).max() > 1e-3, (readouts[i], readouts[j])


# --- errors ---------------------------------------------------------------------------------


def test_step_beyond_threshold_is_refused_on_the_estimator(deq: DEQ) -> None:
    est = estimator(deq, estimate=Adjoint(n=8))
    with pytest.raises(ValueError, match=r"Adjoint\(n=99\) is beyond the solver's threshold of 8"):
        est.gradient_estimate = Adjoint(n=99)
    with pytest.raises(ValueError, match=r"Unrolled\(n=9\) is beyond"):
        est.gradient_estimate = Unrolled(n=9)
    with pytest.raises(ValueError, match=r"Early\(n=99\) is beyond the solver's threshold of 8"):
        est.defense = Early(99)
    with pytest.raises(ValueError, match="beyond"):
        estimator(deq, estimate=AdjointBroyden(n=9))
    with pytest.raises(ValueError, match="beyond"):
        estimator(deq, defense=Early(9))
    assert est.gradient_estimate == Adjoint(n=8) and est.defense == Final()


@pytest.mark.parametrize(
    "solver", [Anderson(threshold=8), FixedPointIteration(threshold=8)], ids=["anderson", "fpi"]
)
def test_broyden_inverse_estimates_need_a_broyden_solver(solver: Solver) -> None:
    deq = tanh_deq(solver)
    with pytest.raises(ValueError, match=r"B_n.*NEGATIVE_IDENTITY"):
        estimator(deq, estimate=Adjoint())
    est = estimator(deq, estimate=Phantom())
    for estimate in (Adjoint(n=2), GradientEnsemble(Adjoint())):
        with pytest.raises(ValueError, match=r"B_n.*NEGATIVE_IDENTITY"):
            est.gradient_estimate = estimate
    with pytest.raises(ValueError, match=r"AdjointBroyden reuses .*B_n.*use a Broyden solver$"):
        est.gradient_estimate = AdjointBroyden()
    assert est.gradient_estimate == Phantom()
    est.gradient_estimate = Adjoint(inverse=InverseEstimate.NEGATIVE_IDENTITY)
    x, y = batch()
    grad = est.loss_gradient(x, one_hot(y))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-4
    np.testing.assert_allclose(
        grad,
        loss_aware_reference(deq, Adjoint(inverse=InverseEstimate.NEGATIVE_IDENTITY), x, y),
        rtol=1e-12,
        atol=1e-15,
    )


@pytest.mark.parametrize(
    ("switch", "match"),
    [
        (lambda est: setattr(est, "defense", "median"), "unknown defense 'median'"),
        (lambda est: setattr(est, "defense", Exact()), "unknown defense"),
        (lambda est: setattr(est, "gradient_estimate", "adjoint"), "unknown gradient estimate"),
        (lambda est: setattr(est, "gradient_estimate", Final()), "unknown gradient estimate"),
        (lambda est: estimator(est.deq, estimate="exact"), "unknown gradient estimate"),
        (lambda est: estimator(est.deq, defense="ensemble"), "unknown defense"),
    ],
    ids=[
        "defense-str",
        "defense-estimate",
        "estimate-str",
        "estimate-defense",
        "ctor-est",
        "ctor-defense",
    ],
)
def test_unknown_estimate_or_defense_is_a_type_error(
    deq: DEQ, switch: Callable[[DEQEstimator], object], match: str
) -> None:
    est = estimator(deq, estimate=Adjoint(), defense=Ensemble())
    with pytest.raises(TypeError, match=match):
        switch(est)
    assert est.gradient_estimate == Adjoint() and est.defense == Ensemble()


@pytest.mark.parametrize(
    "call",
    [
        lambda est, x, y: est.predict(x),
        lambda est, x, y: est.loss_gradient(x, y),
        lambda est, x, y: est.loss_gradient(torch.from_numpy(x), torch.from_numpy(y)),
    ],
    ids=["predict", "loss_gradient-numpy", "loss_gradient-torch"],
)
@pytest.mark.parametrize("shape", [(BATCH, FEATURES + 1), (BATCH, 2, FEATURES)])
def test_wrong_input_shape_names_the_expected_shape(
    deq: DEQ, call: Callable[[DEQEstimator, np.ndarray, np.ndarray], object], shape: tuple[int, ...]
) -> None:
    est = estimator(deq)
    _, y = batch()
    x = np.zeros(shape)
    with pytest.raises(ValueError, match=r"expected \(6,\)"):
        call(est, x, one_hot(y))
