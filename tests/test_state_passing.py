"""State travels with each call: a backward uses the estimate, defense and labels of its own
forward, even after ``using(...)`` has closed or another forward ran on the same module; the
backward solve of the implicit gradient is returned, not stored on the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from test_estimator_api import batch, estimator, tanh_deq
from torch import Tensor, nn

from deq_attacks import (
    DEQEstimator,
    Early,
    Ensemble,
    Exact,
    Final,
    ImplicitGradient,
    Phantom,
    PhantomGradient,
    Unrolled,
)
from deq_attacks.deq import DEQModel, TrainingGradient
from deq_attacks.deq.readout import Readout
from deq_attacks.gradients import BackwardPass, GradientEstimate, constant_cotangent, ready_made
from deq_attacks.numerics import solve_adjoint
from deq_attacks.solvers import Broyden, Trajectory


@dataclass(eq=False)
class Recorder(GradientEstimate):
    """Wraps an estimate; records the defense each backward saw."""

    inner: GradientEstimate
    defenses: list[Readout] = field(default_factory=list)

    def keep_steps(self, threshold: int) -> bool | frozenset[int]:
        return self.inner.keep_steps(threshold)

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        self.defenses.append(backward.readout)
        return self.inner.injection_gradient(backward)

    def __repr__(self) -> str:
        return f"Recorder({self.inner!r})"


def inputs(seed: int) -> Tensor:
    return torch.from_numpy(batch(seed)[0]).requires_grad_()


def test_backward_after_using_closed_uses_its_own_estimate_and_defense() -> None:
    est = estimator(tanh_deq())
    module = est.white_box
    first, second = Recorder(Unrolled(n=2)), Recorder(Exact())
    module.estimate = second
    x1, x2 = inputs(1), inputs(2)[:2].detach().requires_grad_()  # another batch size too
    with module.using(estimate=first, defense=Early(3)):
        out1 = module(x1)
    out2 = module(x2)  # another forward on the same module, with the module's own settings
    out2.sum().backward()
    out1.sum().backward()  # runs after its context closed and after another forward
    assert first.defenses == [Early(3)] and second.defenses == [Final()]
    ones = constant_cotangent(torch.ones(3, 4, dtype=torch.float64))
    with module.using(defense=Early(3)):
        want1 = module.input_gradient(x1.detach(), ones, Unrolled(n=2))
    assert x1.grad is not None and x2.grad is not None
    torch.testing.assert_close(x1.grad, want1, rtol=1e-12, atol=1e-14)
    want2 = module.input_gradient(x2.detach(), constant_cotangent(torch.ones(2, 4)), Exact())
    torch.testing.assert_close(x2.grad, want2, rtol=1e-12, atol=1e-14)
    assert (x1.grad - module.input_gradient(x1.detach(), ones, Exact())).abs().max() > 1e-4


def test_interleaved_loss_aware_forwards_keep_their_own_labels_and_estimates() -> None:
    est = estimator(tanh_deq())
    x1, _ = batch(1)
    x2, _ = batch(2)
    y1, y2 = torch.tensor([0, 2, 3]), torch.tensor([1, 1, 0])
    with est.using(estimate=Unrolled(n=2, k=2, lam=0.5)):
        want1 = est.loss_gradient(torch.from_numpy(x1), y1)
    want2 = est.loss_gradient(torch.from_numpy(x2), y2)
    assert (want1 - est.loss_gradient(torch.from_numpy(x1), y2)).abs().max() > 1e-4

    module, loss = est.white_box, nn.CrossEntropyLoss()
    a, b = torch.from_numpy(x1).requires_grad_(), torch.from_numpy(x2).requires_grad_()
    with module.using(estimate=Unrolled(n=2, k=2, lam=0.5)):
        logits1, _ = module.defended(a, loss, y1)
    logits2, _ = module.defended(b, loss, y2)
    loss(logits2, y2).backward()
    loss(logits1, y1).backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, want1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.grad, want2, rtol=1e-12, atol=1e-14)


def test_solve_adjoint_returns_the_backward_trajectory() -> None:
    deq = tanh_deq()
    x, _ = batch()
    injection = deq.inject(torch.from_numpy(x))
    z_star = deq.solve(injection).final
    z_leaf = z_star.clone().requires_grad_()
    fz = deq.step(z_leaf, injection)
    forcing = torch.randn_like(z_star)
    back = solve_adjoint(Broyden(threshold=40, tol=1e-12), fz, z_leaf, forcing)
    assert isinstance(back, Trajectory) and back.converged.all()
    (vjp,) = torch.autograd.grad(fz, z_leaf, back.final)
    torch.testing.assert_close(back.final, vjp + forcing, rtol=1e-9, atol=1e-10)
    assert not hasattr(deq, "last_backward_trajectory")


def test_implicit_gradient_reports_its_backward_solve_through_on_backward() -> None:
    records: list[Trajectory] = []
    gradient = ImplicitGradient(Broyden(threshold=20, tol=1e-10), on_backward=records.append)
    deq = tanh_deq(training_gradient=gradient).train()
    x, y = batch()
    nn.functional.cross_entropy(deq(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    assert len(records) == 1 and records[0].converged.all()


def test_training_gradients_name_their_ready_made_attack_estimates() -> None:
    solver = Broyden(threshold=9)
    assert ready_made(ImplicitGradient(solver)) == Exact(solver)
    assert ready_made(PhantomGradient(k=3, lam=0.7)) == Phantom(3, 0.7)
    with pytest.raises(TypeError, match="no ready-made attack estimate is registered for str"):
        ready_made("exact")


@dataclass(frozen=True)
class DoubledPhantom(TrainingGradient):
    """A user's own training gradient: the phantom gradient with twice the steps."""

    k: int = 2

    def forward_state(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return PhantomGradient(2 * self.k, 0.5).forward_state(deq, z_star, injection)

    def attach(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return self.forward_state(deq, z_star.detach(), injection)


def test_a_users_training_gradient_registers_its_ready_made_estimate() -> None:
    with pytest.raises(TypeError, match="DoubledPhantom"):
        ready_made(DoubledPhantom())

    @ready_made.register
    def _(gradient: DoubledPhantom) -> GradientEstimate:
        return Phantom(2 * gradient.k, 0.5)

    # (the registration stays: it concerns only this test's own class)
    assert ready_made(DoubledPhantom(3)) == Phantom(6, 0.5)
    deq = tanh_deq(training_gradient=DoubledPhantom(3))
    estimator = DEQEstimator(
        deq, input_shape=(6,), nb_classes=4, estimate=ready_made(deq.training_gradient)
    )
    assert estimator.gradient_estimate == Phantom(6, 0.5)


def test_reprs_stay_short_enough_for_a_table_column() -> None:
    for obj in (Phantom(), Unrolled(n=2), Early(3), Ensemble(), Final()):
        assert len(repr(obj)) <= 40, repr(obj)
    solver = Broyden(threshold=9)
    assert repr(ImplicitGradient(solver, on_backward=print)) == repr(ImplicitGradient(solver))
    # solvers show only the settings that differ from their defaults
    assert repr(solver) == "Broyden(threshold=9)" and repr(Broyden()) == "Broyden()"
    assert repr(Broyden(stop_mode="abs", alpha=0.5)) == "Broyden(stop_mode='abs', alpha=0.5)"
    assert repr(Exact()) == "Exact(backward_solver=Broyden(threshold=30, tol=1e-06))"
