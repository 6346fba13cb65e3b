"""Numerical tests of the attack-side gradient estimates of dL/dx (Sec. 2.1, 4, 5.1).

Models are tiny float64 tanh DEQs ``z = tanh(W z + inj)`` built from fixed seeds, so every
number below is the same whatever test runs first. The references are the exact implicit
gradient (``Exact`` with a tight backward Broyden solve) and, independently of the package, a
dense linear solve ``u* = (I - J_f(z*)^T)^{-1} dL/dz*`` at the forward answer ``z*``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from deq_attacks import (
    DEQ,
    Adjoint,
    AdjointBroyden,
    Anderson,
    Broyden,
    Exact,
    FixedPointIteration,
    GradientEnsemble,
    InverseEstimate,
    Phantom,
    Unrolled,
)
from deq_attacks.gradients import GradientEstimate, input_gradient, loss_cotangent
from deq_attacks.gradients.base import Cotangent
from deq_attacks.solvers import Solver, Trajectory

DIM = 20  # state size of the Remark 4.1 model
CLASSES = 5
N = 40  # forward Broyden iterates for the convergence tests
STEPS = (5, 10, 20, 40)  # the adjoint steps n at which the error is measured
REFERENCE = Exact(Broyden(threshold=80, tol=1e-13))


class TanhLayer(nn.Module):
    """``f(z, inj) = tanh(z W^T + inj)`` on (B, d) states; counts its forward calls."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.calls = 0

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        self.calls += 1
        return torch.tanh(z @ self.weight.T + inj)


def non_normal_weight(dim: int, generator: torch.Generator) -> Tensor:
    """``0.8 M / ||M||_2`` with ``M = randn + 2 * strict upper triangle of randn`` (d, d)."""
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    upper = torch.triu(torch.randn(dim, dim, generator=generator, dtype=torch.float64), 1)
    m = gaussian + 2 * upper
    return 0.8 * m / torch.linalg.matrix_norm(m, ord=2)


def tanh_deq(
    solver: Solver, *, dim: int = DIM, in_features: int | None = None, seed: int = 0
) -> DEQ:
    """A float64 contractive tanh DEQ with a non-normal W, deterministic in ``seed``.

    ``in_features=None`` makes the injection the identity (x has ``dim`` features), so that
    dL/dx = dL/d(injection) = (df/d inj)^T u = (1 - f(z)^2) * u.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weight = non_normal_weight(dim, torch.Generator().manual_seed(seed))
        injection: nn.Module = (
            nn.Identity() if in_features is None else nn.Linear(in_features, dim).double()
        )
        head = nn.Linear(dim, CLASSES).double()
    return DEQ(TanhLayer(weight), injection, head, solver=solver).eval()


def inputs(batch: int, features: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Fixed inputs (batch, features) float64 and labels (batch,)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=generator, dtype=torch.float64)
    labels = torch.arange(batch) % CLASSES
    return x, labels


def ce_sum(labels: Tensor) -> Cotangent:
    """Loss-aware cotangent of the summed cross-entropy (per-sample losses, batch-free)."""
    return loss_cotangent(nn.CrossEntropyLoss(reduction="sum"), labels)


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    """Largest per-sample ``||estimate - reference|| / ||reference||`` over the batch."""
    return float(((estimate - reference).norm(dim=-1) / reference.norm(dim=-1)).max())


def strictly_decreasing(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:]))


@dataclass
class Setup:
    """One solved problem: the model, its inputs, the kept trajectory and the references."""

    deq: DEQ
    x: Tensor  # (B, d) = the injection (identity injection)
    cotangent: Cotangent
    trajectory: Trajectory
    exact: Tensor  # (B, d) Exact's estimate over this trajectory
    dense_u: Tensor  # (B, d) u* by a dense linear solve
    dense_grad: Tensor  # (B, d) (df/d inj)^T u*

    def gradient(self, estimate: GradientEstimate) -> Tensor:
        """dL/dx by ``estimate`` over the kept trajectory."""
        return input_gradient(self.deq, estimate, self.x, self.cotangent, self.trajectory)

    def adjoint_state(self, n: int, grad: Tensor) -> Tensor:
        """``u_n`` recovered from an Adjoint(n) gradient: grad = (1 - f(z_n)^2) * u_n."""
        with torch.no_grad():
            fz = self.deq.step(self.trajectory.state(n), self.x)
        return grad / (1 - fz**2)


def dense_reference(deq: DEQ, z_star: Tensor, x: Tensor, cotangent: Cotangent) -> Tensor:
    """``u*`` (B, d) from ``(I - J_f(z*))^T u* = dL/dz*`` with dense per-sample Jacobians."""
    with torch.enable_grad():
        z_leaf = z_star.detach().requires_grad_()
        logits = deq.logits(z_leaf, x)
        (forcing,) = torch.autograd.grad(logits, z_leaf, cotangent(logits))
    eye = torch.eye(z_star.shape[1], dtype=z_star.dtype)
    solutions = []
    for i in range(z_star.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda z, i=i: deq.step(z[None], x[i : i + 1])[0], z_star[i]
        )
        solutions.append(torch.linalg.solve((eye - jac).T, forcing[i]))
    return torch.stack(solutions)


def make_setup(solver: Solver) -> Setup:
    deq = tanh_deq(solver)
    x, labels = inputs(3, DIM)
    cotangent = ce_sum(labels)
    trajectory = deq.solve(x, keep=True)
    dense_u = dense_reference(deq, trajectory.final, x, cotangent)
    with torch.no_grad():
        dense_grad = (1 - deq.step(trajectory.final, x) ** 2) * dense_u
    exact = input_gradient(deq, REFERENCE, x, cotangent, trajectory)
    return Setup(deq, x, cotangent, trajectory, exact, dense_u, dense_grad)


@pytest.fixture(scope="module")
def broyden40() -> Setup:
    """Broyden, 40 iterates, tol 0 (every step runs until an exact fixed point)."""
    return make_setup(Broyden(threshold=N, tol=0))


@pytest.fixture(scope="module")
def fixed_point40() -> Setup:
    """Plain fixed-point iteration, 40 iterates, tol 0."""
    return make_setup(FixedPointIteration(threshold=N, tol=0))


# --- the test problem itself --------------------------------------------------------------


def test_problem_is_contractive_non_normal_and_exact_matches_dense(broyden40: Setup) -> None:
    layer = broyden40.deq.f
    assert isinstance(layer, TanhLayer)
    weight = layer.weight.detach()
    assert torch.linalg.matrix_norm(weight, ord=2) == pytest.approx(0.8)
    commutator = torch.linalg.matrix_norm(weight @ weight.T - weight.T @ weight)
    assert commutator > 0.3 * torch.linalg.matrix_norm(weight) ** 2  # far from normal
    assert broyden40.trajectory.residuals.min(dim=1).values.max() < 1e-14  # z* converged
    assert relative_error(broyden40.exact, broyden40.dense_grad) < 1e-10


# --- Remark 4.1: the simultaneous adjoint converges to the exact gradient ------------------


@pytest.mark.parametrize(("beta", "bound"), [(0.3, 1e-4), (0.5, 1e-6), (0.9, 1e-6)])
def test_adjoint_converges_to_exact(broyden40: Setup, beta: float, bound: float) -> None:
    """Error of Adjoint(n, beta) against Exact falls at every measured n and ends below
    ``bound`` at n = 40. For beta = 0.3, 40 steps cannot reach 1e-6 even with the exact
    inverse (the error contracts by (1 - beta) per step: 0.7^40 = 6e-7), see the next test."""
    grads = {n: broyden40.gradient(Adjoint(n=n, beta=beta)) for n in STEPS}
    errors = [relative_error(grads[n], broyden40.exact) for n in STEPS]
    assert strictly_decreasing(errors), errors
    assert errors[-1] < bound, errors
    assert errors[-1] < 1e-3 * errors[0], errors
    # the adjoint state itself: u_40 against the dense u*
    u_n = broyden40.adjoint_state(N, grads[N])
    assert relative_error(u_n, broyden40.dense_u) < bound
    # n=None is the last step
    assert torch.equal(broyden40.gradient(Adjoint(beta=beta)), grads[N])


def test_adjoint_keeps_converging_after_the_forward_solve_has() -> None:
    """On another draw of the problem (seed 3; forward converged to 1e-17 by step ~22), the
    beta = 0.3 adjoint must keep converging from n = 40 to n = 60 (with the noise updates
    skipped: 5e-6 then 9e-9; as built: 1e-3 then 2)."""
    deq = tanh_deq(Broyden(threshold=60, tol=0), seed=3)
    x, labels = inputs(3, DIM)
    cotangent = ce_sum(labels)
    trajectory = deq.solve(x, keep=True)
    exact = input_gradient(deq, REFERENCE, x, cotangent, trajectory)
    errors = [
        relative_error(input_gradient(deq, Adjoint(n=n, beta=0.3), x, cotangent, trajectory), exact)
        for n in (40, 60)
    ]
    assert errors[1] < errors[0], errors
    assert errors[1] < 1e-6, errors


def test_adjoint_transposed_inverse_beats_literal_inverse(broyden40: Setup) -> None:
    """B_m^T (the consistent step for the transposed system) converges far faster than the
    B_m printed in Eq. 10. Measured at n = 20, where B^T has reached float64 accuracy and B
    has not; at n = 40 both are near the 1e-13 floor once Broyden's post-convergence noise
    updates are gone (see the test above), so a ratio there would not measure orientation."""
    transposed = relative_error(broyden40.gradient(Adjoint(n=20, beta=0.9)), broyden40.exact)
    literal = relative_error(
        broyden40.gradient(Adjoint(n=20, beta=0.9, transpose=False)), broyden40.exact
    )
    assert transposed < 1e-10
    assert transposed * 100 < literal, (transposed, literal)


def test_negative_identity_adjoint_converges_over_fixed_point(fixed_point40: Setup) -> None:
    """B_m = -I (the damped fixed-point adjoint) needs no Broyden solve."""
    estimate = Adjoint(beta=0.5, inverse=InverseEstimate.NEGATIVE_IDENTITY)
    grads = {n: fixed_point40.gradient(dataclasses.replace(estimate, n=n)) for n in STEPS}
    errors = [relative_error(grads[n], fixed_point40.exact) for n in STEPS]
    assert strictly_decreasing(errors), errors
    assert errors[-1] < 1e-6, errors
    u_n = fixed_point40.adjoint_state(N, grads[N])
    assert relative_error(u_n, fixed_point40.dense_u) < 1e-6


# --- unrolling-based estimates ------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 1.0])
@pytest.mark.parametrize("kind", ["unrolled", "phantom"])
def test_unrolling_approaches_exact_as_k_grows(broyden40: Setup, lam: float, kind: str) -> None:
    """From the converged z_N (Unrolled, n = last) or z* (Phantom), k damped steps give a
    truncated Neumann series of the implicit gradient: error strictly falls with k."""

    def estimate(k: int) -> GradientEstimate:
        return Unrolled(n=None, k=k, lam=lam) if kind == "unrolled" else Phantom(k=k, lam=lam)

    errors = [
        relative_error(broyden40.gradient(estimate(k)), broyden40.exact) for k in (1, 5, 20, 60)
    ]
    assert strictly_decreasing(errors), errors
    assert errors[-1] < 1e-6, errors


# --- the gradient ensemble ----------------------------------------------------------------

ENSEMBLE_OF = [Adjoint(beta=0.5), Unrolled(k=2, lam=0.5), AdjointBroyden()]
ENSEMBLE_IDS = ["adjoint", "unrolled", "adjoint_broyden"]
SMALL_DIM, SMALL_FEATURES, SMALL_N = 10, 6, 8


class SolveSpy:
    """Counts ``deq.solve`` calls (forward solves) and ``f`` applications while installed."""

    def __init__(self, deq: DEQ, monkeypatch: pytest.MonkeyPatch) -> None:
        self.solves = 0
        self.nfe = 0  # f applications inside the solves
        self._layer: TanhLayer = deq.f  # type: ignore[assignment]
        self._start = self._layer.calls
        original = deq.solve

        def spy(injection: Tensor, keep: bool | frozenset[int] = False) -> Trajectory:
            self.solves += 1
            trajectory = original(injection, keep)
            self.nfe += trajectory.nfe
            return trajectory

        monkeypatch.setattr(deq, "solve", spy)

    @property
    def f_calls(self) -> int:
        return self._layer.calls - self._start


def small_deq(solver: Solver) -> DEQ:
    return tanh_deq(solver, dim=SMALL_DIM, in_features=SMALL_FEATURES, seed=2)


@pytest.mark.parametrize("of", ENSEMBLE_OF, ids=ENSEMBLE_IDS)
def test_ensemble_is_mean_of_per_step_estimates_from_one_solve(
    of: Adjoint | Unrolled | AdjointBroyden, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eq. 17: mean over n = 1..N of the per-step estimates, but from ONE forward solve."""
    deq = small_deq(Broyden(threshold=SMALL_N, tol=0))
    x, labels = inputs(3, SMALL_FEATURES)
    cotangent = ce_sum(labels)

    spy = SolveSpy(deq, monkeypatch)
    ensemble = input_gradient(deq, GradientEnsemble(of), x, cotangent)
    assert spy.solves == 1
    assert deq.last_trajectory is not None
    assert bool((deq.last_trajectory.steps == SMALL_N).all())  # every sample ran N steps
    if isinstance(of, Adjoint):  # one sweep: at most N + 1 f applications after the solve
        assert spy.f_calls - spy.nfe <= SMALL_N + 1

    spy = SolveSpy(deq, monkeypatch)
    per_step = [
        input_gradient(deq, dataclasses.replace(of, n=n), x, cotangent)
        for n in range(1, SMALL_N + 1)
    ]
    assert spy.solves == SMALL_N
    mean = torch.stack(per_step).mean(dim=0)
    assert (ensemble - mean).abs().max() <= 1e-12 * mean.abs().max()
    # the ensemble is not just one of its terms
    assert (per_step[0] - mean).abs().max() > 1e-3 * mean.abs().max()


@pytest.mark.parametrize("of", ENSEMBLE_OF, ids=ENSEMBLE_IDS)
def test_ensemble_with_per_sample_stopping_is_batch_independent(
    of: Adjoint | Unrolled | AdjointBroyden,
) -> None:
    """Samples stopping at different steps N_i: each sample's ensemble (mean over its own
    n = 1..N_i) is the one computed for that sample alone."""
    deq = small_deq(Broyden(threshold=12, tol=1e-6))
    x, labels = inputs(4, SMALL_FEATURES)
    x = x * torch.tensor([[0.1], [1.0], [3.0], [10.0]], dtype=x.dtype)  # different difficulty
    estimate = GradientEnsemble(of)
    batch = input_gradient(deq, estimate, x, ce_sum(labels))
    assert deq.last_trajectory is not None
    steps = deq.last_trajectory.steps
    assert len(set(steps.tolist())) > 1, steps  # samples really stopped at different steps
    for i in range(x.shape[0]):
        alone = input_gradient(deq, estimate, x[i : i + 1], ce_sum(labels[i : i + 1]))
        assert deq.last_trajectory.steps.item() == steps[i]
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-10, atol=1e-14)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Unrolled(n=0), ValueError, r"Unrolled\(n\) needs an int n >= 1"),
        (lambda: Adjoint(n=-1), ValueError, r"Adjoint\(n\) needs an int n >= 1"),
        (lambda: AdjointBroyden(n=0), ValueError, r"AdjointBroyden\(n\) needs an int n >= 1"),
        (lambda: Adjoint(n=2.0), ValueError, r"needs an int n >= 1"),  # type: ignore[arg-type]
        (lambda: Adjoint(beta=0), ValueError, r"beta .* must be in \(0, 1\]"),
        (lambda: Adjoint(beta=1.5), ValueError, r"beta .* must be in \(0, 1\]"),
        (lambda: Adjoint(inverse="broyden"), TypeError, "must be an InverseEstimate"),  # type: ignore[arg-type]
        (lambda: Unrolled(k=0), ValueError, r"k \(unrolling steps\) must be an int >= 1"),
        (lambda: Phantom(k=0), ValueError, r"k \(unrolling steps\) must be an int >= 1"),
        (lambda: Unrolled(lam=0), ValueError, r"lambda \(damping\) must be in \(0, 1\]"),
        (lambda: Unrolled(lam=1.5), ValueError, r"lambda \(damping\) must be in \(0, 1\]"),
        (lambda: Phantom(lam=0), ValueError, r"lambda \(damping\) must be in \(0, 1\]"),
        (lambda: Phantom(lam=1.5), ValueError, r"lambda \(damping\) must be in \(0, 1\]"),
        (lambda: GradientEnsemble(Adjoint(n=3)), ValueError, "leave n unset"),
        (lambda: GradientEnsemble(Unrolled(n=1)), ValueError, "leave n unset"),
        (lambda: GradientEnsemble(Phantom()), TypeError, "takes a per-step estimate"),  # type: ignore[arg-type]
        (lambda: Exact(backward_solver="broyden"), TypeError, "backward_solver must be a"),  # type: ignore[arg-type]
    ],
)
def test_invalid_estimates_are_refused_at_construction(
    build: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "estimate",
    [Unrolled(n=9), Adjoint(n=9), AdjointBroyden(n=9)],
    ids=["unrolled", "adjoint", "adjoint_broyden"],
)
def test_step_beyond_threshold_is_refused(estimate: GradientEstimate) -> None:
    deq = small_deq(Broyden(threshold=8))
    x, labels = inputs(2, SMALL_FEATURES)
    with pytest.raises(ValueError, match=r"n=9\) is beyond the solver's threshold of 8"):
        input_gradient(deq, estimate, x, ce_sum(labels))


@pytest.mark.parametrize(
    "solver", [Anderson(threshold=8), FixedPointIteration(threshold=8)], ids=["anderson", "fpi"]
)
@pytest.mark.parametrize(
    "estimate",
    [Adjoint(), Adjoint(n=3), GradientEnsemble(Adjoint()), AdjointBroyden()],
    ids=["adjoint", "adjoint_n3", "ensemble", "adjoint_broyden"],
)
def test_broyden_inverse_needs_broyden(solver: Solver, estimate: GradientEstimate) -> None:
    deq = small_deq(solver)
    x, labels = inputs(2, SMALL_FEATURES)
    # only the adjoint has an alternative inverse to suggest
    remedy = (
        r"B_n.*Broyden solver$"
        if isinstance(estimate, AdjointBroyden)
        else r"B_n.*NEGATIVE_IDENTITY"
    )
    with pytest.raises(ValueError, match=remedy):
        input_gradient(deq, estimate, x, ce_sum(labels))


@pytest.mark.parametrize(
    "solver", [Anderson(threshold=8), FixedPointIteration(threshold=8)], ids=["anderson", "fpi"]
)
def test_negative_identity_adjoint_works_over_any_solver(solver: Solver) -> None:
    deq = small_deq(solver)
    x, labels = inputs(2, SMALL_FEATURES)
    estimate = Adjoint(inverse=InverseEstimate.NEGATIVE_IDENTITY)
    grad = input_gradient(deq, estimate, x, ce_sum(labels))
    assert grad.shape == x.shape
    assert bool(torch.isfinite(grad).all())
    assert grad.abs().max() > 0
    ensemble = input_gradient(deq, GradientEnsemble(estimate), x, ce_sum(labels))
    assert bool(torch.isfinite(ensemble).all())
