"""Any ``f(z, x)`` module as a DEQ (``from_f``): states shaped unlike the input, the input
passed to f as is, and the Exact estimate equal to finite differences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deq_attacks import Broyden, DEQEstimator, Exact, Phantom, WhiteBoxModule
from deq_attacks.adapters import WithStateShape, from_f
from deq_attacks.gradients import BackwardPass, GradientEstimate, loss_cotangent


class Coupled(nn.Module):
    """``f(z, x) = tanh(W z + U x)``: z (B, 5), x (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(5, 5, bias=False)
        self.u = nn.Linear(3, 5)
        with torch.no_grad():
            self.w.weight.mul_(0.5 / torch.linalg.matrix_norm(self.w.weight, ord=2))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.w(z) + self.u(x))


def plain_deq() -> nn.Module:
    torch.manual_seed(0)
    return from_f(
        Coupled().double(),
        nn.Linear(5, 4).double(),
        state_shape=(5,),
        solver=Broyden(threshold=40, tol=1e-13),
    )


def test_state_shape_gives_zero_states_of_that_shape() -> None:
    deq = plain_deq()
    assert isinstance(deq.f, WithStateShape)
    x = torch.rand(2, 3, dtype=torch.float64)
    assert deq.initial_state(deq.inject(x)).shape == (2, 5)
    trajectory = deq.solve(deq.inject(x))
    z = trajectory.final
    torch.testing.assert_close(deq.f.f(z, x), z, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="state_shape must be positive ints"):
        from_f(Coupled(), nn.Identity(), state_shape=(0,))


def test_exact_on_a_plain_f_matches_finite_differences() -> None:
    deq = plain_deq()
    module = WhiteBoxModule(deq, Exact(Broyden(threshold=40, tol=1e-13)))
    x = torch.rand(3, 3, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    loss = nn.CrossEntropyLoss(reduction="sum")
    grad = module.input_gradient(x, loss_cotangent(loss, y))

    def value(inputs: Tensor) -> float:
        with torch.no_grad():
            return float(loss(module(inputs), y))

    h = 1e-6
    fd = torch.zeros_like(x)
    for index in range(x.numel()):
        e = torch.zeros_like(x).flatten()
        e[index] = h
        e = e.reshape(x.shape)
        fd.view(-1)[index] = (value(x + e) - value(x - e)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_plain_deq_works_behind_the_estimator() -> None:
    est = DEQEstimator(plain_deq(), input_shape=(3,), nb_classes=4)
    x = torch.rand(4, 3, dtype=torch.float64).numpy()
    assert est.predict(x).shape == (4, 4)
    assert est.loss_gradient(x, np.arange(4)).shape == (4, 3)


@dataclass(frozen=True)
class OneStep(GradientEstimate):
    """The user estimate of docs/own_deq.md: autograd through one application of f at z*."""

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        deq, inj = backward.deq, backward.injection
        with torch.enable_grad():
            inj = inj.detach().requires_grad_()
            z = deq.step(backward.trajectory.final.detach(), inj)
            logits = deq.logits(z, inj)
            (grad,) = torch.autograd.grad(logits, inj, backward.cotangent(logits))
        return grad


def test_documented_user_estimate_runs_on_both_paths_and_equals_phantom_1_1() -> None:
    est = DEQEstimator(plain_deq(), input_shape=(3,), nb_classes=4, estimate=OneStep())
    x = torch.rand(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    with est.using(estimate=Phantom(k=1, lam=1.0)):
        want = est.loss_gradient(x, y)
    torch.testing.assert_close(est.loss_gradient(x, y), want, rtol=1e-12, atol=1e-15)
    x_leaf = x.clone().requires_grad_()
    nn.functional.cross_entropy(est.model(x_leaf), y).backward()
    torch.testing.assert_close(x_leaf.grad, want, rtol=1e-12, atol=1e-15)
    assert est.white_box.backward_calls == 3  # two loss_gradient calls and this backward
