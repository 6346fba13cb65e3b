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

        def spy(
            injection: Tensor, keep: bool | frozenset[int] = False, **kwargs: object
        ) -> Trajectory:
            self.solves += 1
            trajectory = original(injection, keep, **kwargs)  # type: ignore[arg-type]
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


# --- the adjoint sweep: batched head, reused forward evaluations -------------------------


def per_step_adjoint(
    deq: DEQ, x: Tensor, cotangent: Cotangent, trajectory: Trajectory, n: int, beta: float
) -> Tensor:
    """The simultaneous adjoint written plainly, one head VJP and one f VJP per step (the
    sweep as it was before the head terms were batched): dL/dx at step n (identity
    injection), with B_m^T from the trajectory's Broyden factors."""
    factors = trajectory.inverse
    assert factors is not None
    u = torch.zeros_like(trajectory.z0)
    for m in range(n):
        z = trajectory.state(m).detach().requires_grad_()
        with torch.enable_grad():
            logits = deq.logits(z, x)
            (forcing,) = torch.autograd.grad(logits, z, cotangent(logits))
            (jtu,) = torch.autograd.grad(deq.step(z, x), z, u)
        v = jtu + forcing - u
        u = u - beta * factors.rmatvec(min(m, factors.num_updates), v)
    with torch.enable_grad():
        inj = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(deq.step(trajectory.state(n).detach(), inj), inj, u)
    return grad


@pytest.fixture(params=["stacked", "per-step"])
def stacking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The two ways of the adjoint sweep to take its forcing terms: all from one stacked head
    call (a GPU, small states), or each from its step's backward (large states on a CPU)."""
    from deq_attacks import numerics

    if request.param == "stacked":
        monkeypatch.delitem(numerics.STACK_BUDGET, "cpu")
    else:
        monkeypatch.setitem(numerics.STACK_BUDGET, "cpu", 1)
    return str(request.param)


@pytest.mark.parametrize("loss", ["mean", "sum"])
@pytest.mark.parametrize(("n", "beta"), [(1, 0.5), (6, 0.5), (12, 1.0)])
def test_adjoint_with_batched_head_terms_equals_the_per_step_sweep(
    loss: str, n: int, beta: float, stacking: str
) -> None:
    """All forcing terms dL(z_m)/dz from one stacked head call, or each from its step's
    backward; the loss-aware cotangent is taken per chunk of B logits (a mean loss over the
    wrong batch would scale it)."""
    deq = tanh_deq(Broyden(threshold=12, tol=0))
    x, labels = inputs(3, DIM)
    cotangent = loss_cotangent(nn.CrossEntropyLoss(reduction=loss), labels)
    trajectory = deq.solve(x, keep=True)
    ours = input_gradient(deq, Adjoint(n=n, beta=beta), x, cotangent, trajectory)
    reference = per_step_adjoint(deq, x, cotangent, trajectory, n, beta)
    assert relative_error(ours, reference) <= 1e-6
    assert ours.abs().max() > 1e-3


def test_stacked_head_gradients_do_not_depend_on_how_many_states_a_call_takes() -> None:
    from deq_attacks.numerics import head_gradients

    deq = tanh_deq(Broyden(threshold=6, tol=0))
    x, labels = inputs(3, DIM)
    trajectory = deq.solve(x, keep=True)
    states = [trajectory.state(m) for m in range(6)]
    cotangent = loss_cotangent(nn.CrossEntropyLoss(), labels)
    one_call = head_gradients(lambda z: deq.logits(z, x), states, cotangent, per_call=6)
    for per_call in (1, 4, None):
        grads = head_gradients(lambda z: deq.logits(z, x), states, cotangent, per_call)
        for a, b in zip(grads, one_call):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "estimate",
    [Adjoint(n=5, reuse_forward=True), GradientEnsemble(Adjoint(beta=1.0, reuse_forward=True))],
    ids=["adjoint", "ensemble"],
)
def test_reuse_forward_gives_the_same_estimate_without_evaluating_f_again(
    estimate: GradientEstimate, monkeypatch: pytest.MonkeyPatch, stacking: str
) -> None:
    deq = small_deq(Broyden(threshold=SMALL_N, tol=0))
    x, labels = inputs(3, SMALL_FEATURES)
    plain = dataclasses.replace(
        estimate, **({"reuse_forward": False} if isinstance(estimate, Adjoint) else
                     {"of": dataclasses.replace(estimate.of, reuse_forward=False)})  # type: ignore[attr-defined]
    )  # fmt: skip
    spy = SolveSpy(deq, monkeypatch)
    expected = input_gradient(deq, plain, x, ce_sum(labels))
    recomputed = spy.f_calls - spy.nfe
    spy = SolveSpy(deq, monkeypatch)
    reused = input_gradient(deq, estimate, x, ce_sum(labels))
    assert spy.solves == 1 and spy.f_calls == spy.nfe  # f ran only inside the forward solve
    assert recomputed >= 5
    torch.testing.assert_close(reused, expected, rtol=1e-12, atol=1e-15)


def test_reuse_forward_never_takes_a_jacobian_from_where_a_sample_was_not(
    monkeypatch: pytest.MonkeyPatch, stacking: str
) -> None:
    """Samples that stopped early are frozen at z_{N_i}, but the solver evaluated f elsewhere
    (its candidates) at later steps: those steps evaluate f again. Taking the recorded graph
    anyway gives another (wrong) gradient, which the comparison below catches (a stopped
    sample's later candidates lie about ``tol`` away from its iterate: a loose tol here)."""
    from deq_attacks.numerics import ForwardRecord

    deq = small_deq(Broyden(threshold=12, tol=1e-2))
    x, labels = inputs(4, SMALL_FEATURES)
    x = x * torch.tensor([[0.1], [1.0], [3.0], [10.0]], dtype=x.dtype)
    estimate = Adjoint(n=12, beta=0.5, reuse_forward=True)  # past every sample's own steps
    expected = input_gradient(deq, Adjoint(n=12, beta=0.5), x, ce_sum(labels))
    spy = SolveSpy(deq, monkeypatch)
    reused = input_gradient(deq, estimate, x, ce_sum(labels))
    assert deq.last_trajectory is not None
    steps = deq.last_trajectory.steps
    assert int(steps.min()) < int(steps.max())  # samples stopped at different steps
    # f evaluated again exactly at the steps m = min N_i + 1 .. n that some sample had left
    assert spy.f_calls - spy.nfe == 12 - int(steps.min())
    torch.testing.assert_close(reused, expected, rtol=1e-12, atol=1e-15)

    def unchecked(self: ForwardRecord, m: int, z_m: Tensor) -> tuple[Tensor, Tensor] | None:
        out = self._outputs[m] if m < len(self) else None
        return None if out is None else (self._inputs[m], out)

    monkeypatch.setattr(ForwardRecord, "graph", unchecked)
    wrong = input_gradient(deq, estimate, x, ce_sum(labels))
    # (about 4e-7 of the gradient here: 400 times what the exact path is allowed)
    assert (wrong - expected).abs().max() > 1e-9 * expected.abs().max()


def test_a_forward_record_hands_out_a_graph_only_at_the_iterate_itself() -> None:
    from deq_attacks.numerics import ForwardRecord

    deq = small_deq(Broyden(threshold=6, tol=1e-2))
    x, _ = inputs(4, SMALL_FEATURES)
    x = x * torch.tensor([[0.1], [1.0], [3.0], [10.0]], dtype=x.dtype)
    injection = deq.inject(x)
    record = ForwardRecord()
    trajectory = deq.solve(injection, keep=True, record=record)
    assert len(record) == trajectory.nfe == trajectory.num_steps + 1
    first = int(trajectory.steps.min())
    for m in range(1, trajectory.num_steps + 1):
        graph = record.graph(m, trajectory.state(m))
        assert (graph is not None) == (m <= first), m  # frozen samples: not their iterate
        if graph is not None:
            leaf, out = graph
            torch.testing.assert_close(out, deq.step(trajectory.state(m), injection))
            assert record.graph(m, trajectory.state(m)) is None  # handed out once
    with pytest.raises(RuntimeError, match="one forward solve"):
        deq.solve(injection, record=record)


def test_reuse_forward_through_the_autograd_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from deq_attacks import WhiteBoxModule

    deq = small_deq(Broyden(threshold=SMALL_N, tol=0))
    x, labels = inputs(3, SMALL_FEATURES)
    grads = []
    for reuse in (False, True):
        module = WhiteBoxModule(deq, Adjoint(n=4, reuse_forward=reuse))
        x_leaf = x.clone().requires_grad_()
        spy = SolveSpy(deq, monkeypatch)
        nn.functional.cross_entropy(module(x_leaf), labels).backward()
        assert (spy.f_calls - spy.nfe == 1) if reuse else (spy.f_calls - spy.nfe > 4)
        grads.append(x_leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)


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
