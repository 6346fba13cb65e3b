"""BackpropThroughSolver: the exact gradient of the defended logits as computed.

Models are tiny float64 tanh DEQs ``z = tanh(W z + A x + b)`` with a fixed random W. With
``gain`` above 1 the solvers do not converge in a few steps (relative residual >= 0.05 at the
last iterate, checked): there the estimate must equal central finite differences of the
defended loss in the input x, where Exact does not; with a contraction solved to rounding
level it must equal Exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchattacks
from test_estimator_api import TanhLayer
from torch import Tensor, nn

from deq_attacks import (
    DEQ,
    Anderson,
    BackpropThroughSolver,
    Broyden,
    DEQEstimator,
    Early,
    Ensemble,
    Exact,
    Final,
    FixedPointIteration,
    ImplicitGradient,
    PhantomGradient,
    Readout,
    WhiteBoxModule,
)
from deq_attacks.deq.backward import TrainingGradient
from deq_attacks.gradients import GradientEstimate, input_gradient, loss_cotangent
from deq_attacks.gradients.base import Cotangent
from deq_attacks.solvers import Solver

DIM, FEATURES, CLASSES = 6, 4, 3
STEPS = 4  # forward iterates of the unconverged models
H = 1e-6  # finite-difference step in x


def tanh_deq(
    solver: Solver, gain: float, training_gradient: TrainingGradient | None = None, seed: int = 0
) -> DEQ:
    """A float64 tanh DEQ, W = gain * M / ||M||_2 (M Gaussian), deterministic in ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = torch.randn(DIM, DIM, dtype=torch.float64)
        weight = gain * m / torch.linalg.matrix_norm(m, ord=2)
        injection = nn.Linear(FEATURES, DIM).double()
        head = nn.Linear(DIM, CLASSES).double()
    deq = DEQ(
        TanhLayer(weight), injection, head, solver=solver, training_gradient=training_gradient
    )
    return deq.eval()


def inputs(batch: int = 3, seed: int = 1, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    """x (batch, FEATURES) float64 and labels (batch,)."""
    x = torch.randn(batch, FEATURES, generator=torch.Generator().manual_seed(seed))
    return (scale * x).double(), torch.arange(batch) % CLASSES


def ce_sum(labels: Tensor) -> Cotangent:
    return loss_cotangent(nn.CrossEntropyLoss(reduction="sum"), labels)


def defended_loss(deq: DEQ, x: Tensor, y: Tensor, readout: Readout) -> Tensor:
    """Per-sample cross-entropy (B,) of the defended logits ``deq(x, readout)``."""
    with torch.no_grad():
        return nn.functional.cross_entropy(deq(x, readout=readout), y, reduction="none")


def finite_differences(
    deq: DEQ, x: Tensor, y: Tensor, readout: Readout, h: float = H
) -> tuple[Tensor, list[Tensor]]:
    """Central differences of the per-sample defended loss in each input coordinate (B, F),
    and the step counts of every perturbed solve."""
    grad = torch.zeros_like(x)
    steps = []
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        up = defended_loss(deq, x + e, y, readout)
        assert deq.last_trajectory is not None
        steps.append(deq.last_trajectory.steps.clone())
        down = defended_loss(deq, x - e, y, readout)
        steps.append(deq.last_trajectory.steps.clone())
        grad[:, j] = (up - down) / (2 * h)
    return grad, steps


def relative_error(a: Tensor, b: Tensor) -> float:
    """Largest per-sample ``||a - b|| / ||b||``."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def bptt(deq: DEQ, x: Tensor, y: Tensor, readout: Readout, **kwargs: bool) -> Tensor:
    return input_gradient(deq, BackpropThroughSolver(**kwargs), x, ce_sum(y), readout=readout)


SOLVERS: dict[str, Callable[[], Solver]] = {
    "broyden": lambda: Broyden(threshold=STEPS, tol=0),
    "anderson": lambda: Anderson(threshold=STEPS, tol=0),
    "fixed_point": lambda: FixedPointIteration(threshold=STEPS, tol=0),
}
READOUTS: dict[str, Readout] = {"final": Final(), "early2": Early(2), "ensemble": Ensemble()}
TRAINING: dict[str, TrainingGradient] = {
    "implicit": ImplicitGradient(),
    "phantom": PhantomGradient(k=3, lam=0.5),
}


# --- the definition: equal to finite differences of what the defended model computes --------


@pytest.mark.parametrize("training", TRAINING, ids=list(TRAINING))
@pytest.mark.parametrize("readout", READOUTS, ids=list(READOUTS))
@pytest.mark.parametrize("solver", SOLVERS, ids=list(SOLVERS))
def test_equals_finite_differences_of_the_unconverged_defended_loss(
    solver: str, readout: str, training: str
) -> None:
    deq = tanh_deq(SOLVERS[solver](), gain=2.5, training_gradient=TRAINING[training])
    x, y = inputs()
    grad = bptt(deq, x, y, READOUTS[readout])
    trajectory = deq.last_trajectory
    assert trajectory is not None
    assert float(trajectory.residuals[:, -1].min()) >= 0.05  # not converged, any sample
    assert int(trajectory.steps.min()) == STEPS
    reference, _ = finite_differences(deq, x, y, READOUTS[readout])
    assert relative_error(grad, reference) < 1e-6
    # the estimates of the paper are not this gradient here
    exact = input_gradient(deq, Exact(), x, ce_sum(y), readout=READOUTS[readout])
    assert relative_error(exact, reference) > 1e-2


def test_lowest_residual_choice_is_part_of_the_gradient() -> None:
    """With return_best, Final differentiates the chosen (not the last) iterate: the test
    model has a sample whose best iterate is not its last, and return_best changes the
    gradient there, each equal to its own finite differences."""
    x, y = inputs()
    grads = {}
    for best in (True, False):
        deq = tanh_deq(Broyden(threshold=STEPS, tol=0, return_best=best), gain=2.5)
        grads[best] = bptt(deq, x, y, Final())
        assert deq.last_trajectory is not None
        residuals = deq.last_trajectory.residuals
        reference, _ = finite_differences(deq, x, y, Final())
        assert relative_error(grads[best], reference) < 1e-6
    not_last = residuals.argmin(dim=1) != residuals.shape[1] - 1
    assert not_last.any()
    assert relative_error(grads[True][not_last], grads[False][not_last]) > 1e-2


@pytest.mark.parametrize(
    "solver",
    [
        Broyden(threshold=40, tol=1e-12),
        Anderson(threshold=60, tol=1e-12),
        FixedPointIteration(threshold=200, tol=1e-13),
    ],
    ids=["broyden", "anderson", "fixed_point"],
)
def test_equals_exact_on_a_converged_model(solver: Solver) -> None:
    deq = tanh_deq(solver, gain=0.6)
    x, y = inputs()
    grad = bptt(deq, x, y, Final())
    assert deq.last_trajectory is not None and bool(deq.last_trajectory.converged.all())
    exact = input_gradient(deq, Exact(Broyden(threshold=60, tol=1e-14)), x, ce_sum(y))
    assert relative_error(grad, exact) < 1e-9


# --- per-sample stopping, batch independence, scale ------------------------------------------


def stopping_problem() -> tuple[DEQ, Tensor, Tensor]:
    """Broyden with tol 1e-4 on inputs of different difficulty: samples stop at different
    steps (checked by the tests)."""
    deq = tanh_deq(Broyden(threshold=12, tol=1e-4), gain=0.9)
    x, y = inputs(batch=4)
    x = x * torch.tensor([[0.05], [0.5], [1.5], [4.0]], dtype=x.dtype)
    return deq, x, y


@pytest.mark.parametrize("readout", READOUTS.values(), ids=list(READOUTS))
def test_per_sample_stopping_gradient_is_batch_independent(readout: Readout) -> None:
    deq, x, y = stopping_problem()
    batch = bptt(deq, x, y, readout)
    assert deq.last_trajectory is not None
    steps = deq.last_trajectory.steps
    assert len(set(steps.tolist())) > 1, steps
    for i in range(x.shape[0]):
        alone = bptt(deq, x[i : i + 1], y[i : i + 1], readout)
        assert deq.last_trajectory.steps.item() == steps[i]
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("readout", READOUTS.values(), ids=list(READOUTS))
def test_per_sample_stopping_matches_finite_differences_away_from_decisions(
    readout: Readout,
) -> None:
    """FD with a small step that changes no stopping decision (checked) equals the estimate."""
    deq, x, y = stopping_problem()
    grad = bptt(deq, x, y, readout)
    assert deq.last_trajectory is not None
    steps = deq.last_trajectory.steps.clone()
    reference, perturbed_steps = finite_differences(deq, x, y, readout, h=1e-7)
    # a no-grad solve for Early(n) stops at n: compare the decisions up to there
    horizon = readout.horizon(deq.solver.threshold)
    assert all(torch.equal(s.clamp(max=horizon), steps.clamp(max=horizon)) for s in perturbed_steps)
    assert relative_error(grad, reference) < 1e-5


def test_gradient_is_linear_in_the_loss_scale() -> None:
    deq = tanh_deq(Broyden(threshold=STEPS, tol=0), gain=2.5)
    x, y = inputs()
    base = bptt(deq, x, y, Ensemble())
    scaled = input_gradient(
        deq,
        BackpropThroughSolver(),
        x,
        loss_cotangent(lambda logits, labels: 1e-3 * nn.functional.cross_entropy(
            logits, labels, reduction="sum"), y),
        readout=Ensemble(),
    )  # fmt: skip
    torch.testing.assert_close(scaled, 1e-3 * base, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", SOLVERS, ids=list(SOLVERS))
def test_checkpointed_equals_plain(solver: str) -> None:
    deq = tanh_deq(SOLVERS[solver](), gain=2.5)
    x, y = inputs()
    for readout in READOUTS.values():
        plain = bptt(deq, x, y, readout)
        recomputed = bptt(deq, x, y, readout, checkpoint=True)
        torch.testing.assert_close(recomputed, plain, rtol=1e-12, atol=1e-15)


def test_exact_fixed_point_gives_a_finite_gradient() -> None:
    """x = 0 with a bias-free injection is an exact fixed point z = 0 (residual 0): the
    norms of the residuals and of Broyden's update tests never enter the gradient."""
    deq = tanh_deq(Broyden(threshold=STEPS, tol=0), gain=2.5)
    with torch.no_grad():
        deq.injection.bias.zero_()
    x = torch.zeros(2, FEATURES, dtype=torch.float64)
    for readout in READOUTS.values():
        grad = bptt(deq, x, torch.tensor([0, 1]), readout)
        assert torch.isfinite(grad).all()
        assert deq.last_trajectory is not None
        assert float(deq.last_trajectory.abs_residuals.max()) == 0.0


def test_parameters_are_untouched_and_no_state_leaks() -> None:
    """The estimate leaves no gradient on the parameters and does not replace the forward's
    trajectory."""
    deq = tanh_deq(Broyden(threshold=STEPS, tol=0), gain=2.5)
    x, y = inputs()
    bptt(deq, x, y, Final())
    forward_trajectory = deq.last_trajectory
    assert all(p.grad is None for p in deq.parameters())
    grad = input_gradient(deq, BackpropThroughSolver(), x, ce_sum(y), trajectory=forward_trajectory)
    assert deq.last_trajectory is forward_trajectory
    assert torch.isfinite(grad).all()


def test_rejects_a_non_bool_checkpoint() -> None:
    with pytest.raises(TypeError, match="checkpoint"):
        BackpropThroughSolver(checkpoint=1)  # type: ignore[arg-type]


def test_solver_refuses_checkpoint_without_differentiable() -> None:
    solver = Broyden(threshold=2)
    with pytest.raises(ValueError, match="differentiable"):
        solver.solve(lambda z: z, torch.zeros(1, 2), checkpoint=True)


# --- both consumers ---------------------------------------------------------------------------


@pytest.mark.parametrize("readout", READOUTS.values(), ids=list(READOUTS))
def test_autograd_path_gives_the_true_gradient(readout: Readout) -> None:
    """torch.autograd.grad through WhiteBoxModule(deq, BackpropThroughSolver(), defense)
    equals finite differences of the defended loss (per-sample stopping on)."""
    deq, x, y = stopping_problem()
    module = WhiteBoxModule(deq, BackpropThroughSolver(), readout).eval()
    x_leaf = x.clone().requires_grad_()
    loss = nn.functional.cross_entropy(module(x_leaf), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_leaf)
    reference, _ = finite_differences(deq, x, y, readout, h=1e-7)
    assert relative_error(grad, reference) < 1e-5
    assert module.backward_calls == 1


def test_art_loss_gradient_gives_the_true_gradient() -> None:
    """DEQEstimator.loss_gradient (ART, mean cross-entropy) equals finite differences of the
    mean defended loss, for every defense."""
    deq = tanh_deq(Broyden(threshold=STEPS, tol=0), gain=2.5)
    x, y = inputs()
    estimator = DEQEstimator(
        deq,
        input_shape=(FEATURES,),
        nb_classes=CLASSES,
        estimate=BackpropThroughSolver(),
        clip_values=None,
    )
    for readout in READOUTS.values():
        with estimator.using(defense=readout):
            grad = estimator.loss_gradient(x.numpy(), y.numpy())
        reference, _ = finite_differences(deq, x, y, readout)
        assert grad.dtype == np.float64
        assert relative_error(torch.from_numpy(grad), reference / len(x)) < 1e-6


def test_torchattacks_pgd_step_follows_the_true_gradient() -> None:
    """torchattacks' PGD (one step, no random start) on the module moves each coordinate by
    the sign of the finite-difference gradient of the defended loss."""
    deq = tanh_deq(FixedPointIteration(threshold=STEPS, tol=0), gain=2.5).float()
    x = torch.rand(3, FEATURES)
    y = torch.arange(3) % CLASSES
    module = WhiteBoxModule(deq, BackpropThroughSolver(), Early(3)).eval()
    alpha = 0.01
    adv = torchattacks.PGD(module, eps=alpha, alpha=alpha, steps=1, random_start=False)(x, y)
    grad = input_gradient(deq, BackpropThroughSolver(), x, ce_sum(y), readout=Early(3))
    other: GradientEstimate = Exact()
    exact = input_gradient(deq, other, x, ce_sum(y), readout=Early(3))
    decided = grad.abs() > 1e-4 * grad.abs().max()
    expected = (x + alpha * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(adv[decided], expected[decided], rtol=0, atol=1e-6)
    assert (grad.sign() != exact.sign()).any()  # the step is not Exact's


class ScaledTanh(nn.Module):
    """``f(z, inj) = tanh(z W^T + inj) * exp(inj_0)``: overflows for inj_0 > ~709."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(z @ self.weight.T + inj) * inj[:, :1].exp()


@pytest.mark.parametrize("solver", SOLVERS, ids=list(SOLVERS))
def test_a_diverging_sample_does_not_touch_the_others(solver: str) -> None:
    """A sample whose f overflows is frozen by the solver; the other sample's gradient is
    finite and the same as computed alone."""
    weight = 0.3 * torch.randn(
        4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    deq = DEQ(
        ScaledTanh(weight), nn.Identity(), nn.Linear(4, CLASSES).double(), solver=SOLVERS[solver]()
    ).eval()
    x = torch.tensor([[0.1, 0.2, -0.3, 0.4], [720.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    for readout in READOUTS.values():
        with pytest.warns(UserWarning, match="diverged"):
            batch = bptt(deq, x, y, readout)
        assert deq.last_trajectory is not None
        assert deq.last_trajectory.diverged.tolist() == [False, True]
        alone = bptt(deq, x[:1], y[:1], readout)
        assert torch.isfinite(batch[0]).all()
        torch.testing.assert_close(batch[:1], alone, rtol=1e-12, atol=1e-15)
