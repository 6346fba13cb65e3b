"""Tests of the fixed-point solvers (Broyden, Anderson, fixed-point iteration) and the
Trajectory they record: convergence to analytic fixed points, per-sample independence,
Broyden's inverse estimates B_n, divergence handling, residual bookkeeping and bad settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from deq_attacks.solvers import (
    Anderson,
    Broyden,
    FixedPointIteration,
    Solver,
    StopMode,
    Trajectory,
)

D64 = torch.float64
Map = Callable[[Tensor], Tensor]


def _matrix_with_norm(d: int, norm: float, symmetric: bool = False) -> Tensor:
    """A random (d, d) float64 matrix with spectral norm ``norm``."""
    a = torch.randn(d, d, dtype=D64)
    if symmetric:
        a = a + a.T
    return norm * a / torch.linalg.matrix_norm(a, ord=2)


def _solvers(threshold: int, tol: float, stop_mode: StopMode = StopMode.REL) -> list[Solver]:
    """One solver of each kind; fixed-point iteration gets more steps (linear convergence)."""
    return [
        Broyden(threshold=threshold, tol=tol, stop_mode=stop_mode),
        Anderson(threshold=threshold, tol=tol, stop_mode=stop_mode),
        FixedPointIteration(threshold=10 * threshold, tol=tol, stop_mode=stop_mode),
    ]


def _ids(solvers: list[Solver]) -> list[str]:
    return [type(s).__name__ for s in solvers]


# --- 1. convergence to the analytic fixed point ---------------------------------------------


@pytest.mark.parametrize("stop_mode", [StopMode.REL, StopMode.ABS])
@pytest.mark.parametrize("solver", _solvers(60, 1e-8), ids=_ids(_solvers(60, 1e-8)))
def test_affine_map_reaches_analytic_fixed_point(solver: Solver, stop_mode: StopMode) -> None:
    """z = A z + U x with ||A||_2 = 0.9: every sample stops with residual <= tol and lies
    within ||g(z)|| / (1 - 0.9) of z* = (I - A)^{-1} U x."""
    solver = dataclasses.replace(solver, stop_mode=stop_mode)
    d, m, batch, tol = 10, 4, 5, 1e-8
    A = _matrix_with_norm(d, 0.9)
    U = torch.randn(d, m, dtype=D64)
    x = torch.randn(batch, m, dtype=D64)
    c = x @ U.T

    def fn(z: Tensor) -> Tensor:
        return z @ A.T + c

    z_star = torch.linalg.solve(torch.eye(d, dtype=D64) - A, c.T).T
    traj = solver.solve(fn, torch.zeros(batch, d, dtype=D64))
    f_final = fn(traj.final)
    g_norm = (f_final - traj.final).norm(dim=-1)
    residual = g_norm if stop_mode is StopMode.ABS else g_norm / f_final.norm(dim=-1)
    assert traj.converged.all()
    assert not traj.diverged.any()
    assert (traj.steps < solver.threshold).all(), "tol reached, so the solver must stop early"
    assert (residual <= tol).all(), residual
    error = (traj.final - z_star).norm(dim=-1)
    # g(z) = (A - I)(z - z*), so ||z - z*|| <= ||g(z)|| / (1 - ||A||)
    assert (error <= g_norm / 0.1 * (1 + 1e-6) + 1e-15).all()
    assert (error <= 1e-6 * z_star.norm(dim=-1)).all(), error


# --- 2. batch independence --------------------------------------------------------------------


def _per_sample_map(A: Tensor, c: Tensor, b: Tensor, blow: Tensor) -> Map:
    """``f(z)_i = c_i tanh(A z_i) + b_i``, row-wise per sample: c_i sets the contraction (NaN
    makes the sample NaN); where blow_i is set, ``exp(50 (1 + ||z_i||^2))`` is added, so its
    first iterate is ~1e22 and the next one inf."""

    def fn(z: Tensor) -> Tensor:
        out = c[:, None] * torch.tanh(z @ A.T) + b
        grow = torch.exp(50 * (1 + z.pow(2).sum(dim=-1, keepdim=True)))
        return torch.where(blow[:, None], out + grow, out)

    return fn


def _assert_same_record(
    alone: Trajectory, batched: Trajectory, i: int, threshold: int, atol: float = 1e-12
) -> None:
    """Sample 0 of ``alone`` and sample ``i`` of ``batched`` have the same record."""
    steps = int(alone.steps[0])
    assert int(batched.steps[i]) == steps
    assert bool(batched.converged[i]) == bool(alone.converged[0])
    assert bool(batched.diverged[i]) == bool(alone.diverged[0])
    torch.testing.assert_close(batched.final[i], alone.final[0], rtol=0, atol=atol)
    torch.testing.assert_close(batched.mean_state()[i], alone.mean_state()[0], rtol=0, atol=atol)
    for n in range(threshold + 1):
        torch.testing.assert_close(batched.state(n)[i], alone.state(n)[0], rtol=0, atol=atol)
    for n in range(1, threshold + 1):
        a, b = alone.residual(n)[0], batched.residual(n)[i]
        if torch.isnan(a):
            assert torch.isnan(b)
        else:
            torch.testing.assert_close(b, a, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "solver",
    [
        Broyden(threshold=25, tol=1e-9),
        Anderson(threshold=25, tol=1e-9),
        FixedPointIteration(threshold=60, tol=1e-9),
    ],
    ids=["Broyden", "Anderson", "FixedPointIteration"],
)
def test_sample_record_does_not_depend_on_batch(solver: Solver) -> None:
    """A sample's states, residuals, steps and final are the same alone, in a batch of
    ordinary samples, and beside samples that converge fast, slowly, go NaN or blow up."""
    d = 6
    A = _matrix_with_norm(d, 0.9)
    # sample roles: 0 ordinary, 1 fast (c=0.1), 2 slow (c=1.05 on tanh), 3 NaN, 4 blows to inf,
    # 5 ordinary
    c = torch.tensor([0.8, 0.1, 1.05, float("nan"), 0.8, 0.6], dtype=D64)
    blow = torch.tensor([False, False, False, False, True, False])
    b = torch.randn(6, d, dtype=D64)
    z0 = 0.1 * torch.randn(6, d, dtype=D64)

    def solve(rows: list[int]) -> Trajectory:
        fn = _per_sample_map(A, c[rows], b[rows], blow[rows])
        return solver.solve(fn, z0[rows], keep=True)

    full = solve(list(range(6)))
    assert full.diverged.tolist() == [False, False, False, True, True, False]
    assert torch.isfinite(full.final).all()
    steps = full.steps.tolist()
    assert steps[1] < steps[0], "the fast sample must stop earlier than the ordinary one"
    assert len(set(steps)) >= 3, f"samples should stop at different steps, got {steps}"
    for i in range(6):
        _assert_same_record(solve([i]), full, i, solver.threshold)
    # ordinary samples 0 and 5: alone vs with only each other vs with only the odd ones
    pair = solve([0, 5])
    _assert_same_record(pair, full, 0, solver.threshold)
    for rows in ([3, 0], [4, 0], [1, 0, 2]):
        mixed = solve(rows)
        _assert_same_record(solve([0]), mixed, rows.index(0), solver.threshold)


# --- 3. Broyden's inverse estimates -----------------------------------------------------------


def test_broyden_inverse_matches_dense_recomputation() -> None:
    """B_n rebuilt densely from the recorded iterates (B_0 = -I, Eq. 8 rank-one updates)
    equals ``traj.inverse.dense(n)``; matvec / rmatvec agree with it; iterates obey
    z_n = z_{n-1} - alpha B_{n-1} g(z_{n-1})."""
    d, batch, alpha, eps = 6, 3, 0.8, 1e-6
    W = _matrix_with_norm(d, 0.8)
    inj = torch.randn(batch, d, dtype=D64) * torch.tensor([[0.3], [1.0], [2.0]], dtype=D64)

    def fn(z: Tensor) -> Tensor:
        return torch.tanh(z @ W.T + inj)

    solver = Broyden(threshold=9, tol=1e-11, alpha=alpha)
    traj = solver.solve(fn, torch.zeros(batch, d, dtype=D64), keep=True)
    inverse = traj.inverse
    assert inverse is not None
    assert inverse.num_updates == traj.num_steps
    eye = torch.eye(d, dtype=D64)
    for i in range(batch):
        B = -eye
        updates = 0
        for n in range(1, traj.num_steps + 1):
            torch.testing.assert_close(inverse.dense(n - 1)[i], B, rtol=0, atol=1e-10)
            v = torch.randn(batch, d, dtype=D64)
            torch.testing.assert_close(inverse.matvec(n - 1, v)[i], B @ v[i], rtol=0, atol=1e-10)
            torch.testing.assert_close(inverse.rmatvec(n - 1, v)[i], B.T @ v[i], rtol=0, atol=1e-10)
            z_prev, z_n = traj.state(n - 1)[i], traj.state(n)[i]
            g_prev = fn(traj.state(n - 1))[i] - z_prev
            g_n = fn(traj.state(n))[i] - z_n
            if n > int(traj.steps[i]):
                torch.testing.assert_close(z_n, z_prev, rtol=0, atol=0)  # frozen: no update
                continue
            torch.testing.assert_close(z_n, z_prev - alpha * B @ g_prev, rtol=0, atol=1e-10)
            dz, dg = z_n - z_prev, g_n - g_prev
            b_dg = B @ dg
            denom = dz @ b_dg
            if denom.abs() > eps * dz.norm() * b_dg.norm():
                B = B + torch.outer(dz - b_dg, dz @ B) / denom
                updates += 1
        torch.testing.assert_close(inverse.dense(traj.num_steps)[i], B, rtol=0, atol=1e-10)
        assert updates >= 4, f"sample {i} made only {updates} Broyden updates: test too weak"
    # B_N approximates (J_f(z*) - I)^{-1} well enough to be useful, far better than -I
    z_star = traj.final
    J = torch.autograd.functional.jacobian(lambda z: torch.tanh(W @ z + inj[1]), z_star[1])
    true_inv = torch.linalg.inv(J - eye)
    err_bn = torch.linalg.matrix_norm(inverse.dense(traj.num_steps)[1] - true_inv)
    err_b0 = torch.linalg.matrix_norm(-eye - true_inv)
    assert err_bn < err_b0


def test_broyden_inverse_index_out_of_range() -> None:
    traj = Broyden(threshold=3, tol=0.0).solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=D64))
    assert traj.inverse is not None
    with pytest.raises(IndexError, match="not recorded"):
        traj.inverse.dense(traj.inverse.num_updates + 1)
    assert Anderson(threshold=3).solve(lambda z: 0.5 * z, torch.ones(1, 2)).inverse is None


# --- 4. divergence ----------------------------------------------------------------------------


class _InfAtCall:
    """``f(z) = 0.5 tanh(z) + b``, except that evaluation number ``call`` (0 = f(z_0)) returns
    inf for sample ``bad``."""

    def __init__(self, b: Tensor, bad: int, call: int) -> None:
        self.b, self.bad, self.call, self.calls = b, bad, call, 0

    def __call__(self, z: Tensor) -> Tensor:
        out = 0.5 * torch.tanh(z) + self.b
        if self.calls == self.call:
            out = out.clone()
            out[self.bad] = float("inf")
        self.calls += 1
        return out


@pytest.mark.parametrize(
    "solver",
    [
        Broyden(threshold=8, tol=0.0),
        Anderson(threshold=8, tol=0.0),
        FixedPointIteration(threshold=8, tol=0.0),
    ],
    ids=["Broyden", "Anderson", "FixedPointIteration"],
)
def test_inf_at_step_three_freezes_only_that_sample(solver: Solver) -> None:
    b = torch.randn(3, 4, dtype=D64)
    z0 = torch.zeros(3, 4, dtype=D64)
    traj = solver.solve(_InfAtCall(b, bad=1, call=3), z0, keep=True)  # f(z_3) is inf
    clean = solver.solve(_InfAtCall(b, bad=1, call=-1), z0, keep=True)
    assert traj.diverged.tolist() == [False, True, False]
    assert not traj.converged[1]
    assert traj.steps.tolist() == [8, 2, 8]
    assert torch.isfinite(traj.final).all()
    assert torch.isfinite(traj.residuals).all()
    assert torch.isfinite(traj.state_sum).all()
    for n in range(3, 9):  # frozen at z_2, its last finite iterate
        torch.testing.assert_close(traj.state(n)[1], traj.state(2)[1], rtol=0, atol=0)
    for n in range(3):
        torch.testing.assert_close(traj.state(n)[1], clean.state(n)[1], rtol=0, atol=0)
    torch.testing.assert_close(traj.final[1], clean.state(2)[1], rtol=0, atol=0)
    own_mean = (clean.state(1)[1] + clean.state(2)[1]) / 2
    torch.testing.assert_close(traj.mean_state()[1], own_mean, rtol=0, atol=1e-15)
    for i in (0, 2):  # the others are unaffected
        for n in range(9):
            torch.testing.assert_close(traj.state(n)[i], clean.state(n)[i], rtol=0, atol=1e-12)
        torch.testing.assert_close(traj.final[i], clean.final[i], rtol=0, atol=1e-12)


def test_nan_from_the_start_keeps_z0() -> None:
    z0 = torch.randn(2, 3, dtype=D64)

    def fn(z: Tensor) -> Tensor:
        out = 0.5 * z + 1
        return torch.cat([out[:1], torch.full_like(out[1:], float("nan"))])

    for solver in _solvers(30, 1e-6):
        traj = solver.solve(fn, z0)
        assert traj.diverged.tolist() == [False, True]
        assert int(traj.steps[1]) == 0
        torch.testing.assert_close(traj.final[1], z0[1], rtol=0, atol=0)
        assert traj.converged[0]


# --- 5. residual bookkeeping ------------------------------------------------------------------


@pytest.mark.parametrize("solver", _solvers(12, 1e-6), ids=_ids(_solvers(12, 1e-6)))
def test_residuals_states_and_mean_are_consistent(solver: Solver) -> None:
    d = 5
    W = _matrix_with_norm(d, 0.7)
    inj = torch.randn(4, d, dtype=D64) * torch.tensor([[0.01], [0.5], [1.0], [3.0]], dtype=D64)

    def fn(z: Tensor) -> Tensor:
        return torch.tanh(z @ W.T + inj)

    traj = solver.solve(fn, torch.zeros(4, d, dtype=D64), keep=True)
    N = traj.num_steps
    assert int(traj.steps.max()) == N
    assert len(set(traj.steps.tolist())) > 1, "samples should stop at different steps"
    assert traj.residuals.shape == traj.abs_residuals.shape == (4, N)
    for n in range(1, N + 1):
        z_n = traj.state(n)
        f_n = fn(z_n)
        abs_res = (f_n - z_n).norm(dim=-1)
        torch.testing.assert_close(traj.residuals[:, n - 1], abs_res / f_n.norm(dim=-1))
        torch.testing.assert_close(traj.abs_residuals[:, n - 1], abs_res)
        torch.testing.assert_close(traj.residual(n), traj.residuals[:, n - 1])
    for i in range(4):
        own = torch.stack([traj.state(n)[i] for n in range(1, int(traj.steps[i]) + 1)])
        torch.testing.assert_close(traj.mean_state()[i], own.mean(dim=0))
        torch.testing.assert_close(traj.state_sum[i], own.sum(dim=0))
        # lowest-residual iterate (return_best=True)
        best = int(traj.residuals[i, : int(traj.steps[i])].argmin()) + 1
        torch.testing.assert_close(traj.final[i], traj.state(best)[i], rtol=0, atol=0)
    for n in range(N + 1, solver.threshold + 1):  # beyond the steps run: frozen last iterate
        torch.testing.assert_close(traj.state(n), traj.state(N), rtol=0, atol=0)
        torch.testing.assert_close(traj.residual(n), traj.residual(N), rtol=0, atol=0)
    torch.testing.assert_close(traj.state(0), torch.zeros(4, d, dtype=D64))
    with pytest.raises(ValueError, match="beyond the solver's threshold"):
        traj.state(solver.threshold + 1)
    with pytest.raises(ValueError, match="beyond the solver's threshold"):
        traj.residual(solver.threshold + 1)
    with pytest.raises(ValueError, match="residuals start at z_1"):
        traj.residual(0)

    # keep={3}: only z_3 is held, yet the running mean (Ensemble readout) is the same
    only3 = solver.solve(fn, torch.zeros(4, d, dtype=D64), keep={3})
    assert set(only3.states) == {3}
    torch.testing.assert_close(only3.state(3), traj.state(3), rtol=0, atol=0)
    torch.testing.assert_close(only3.mean_state(), traj.mean_state(), rtol=0, atol=0)
    with pytest.raises(KeyError, match="not kept"):
        only3.state(2)
    nothing = solver.solve(fn, torch.zeros(4, d, dtype=D64))
    assert nothing.states == {}
    torch.testing.assert_close(nothing.mean_state(), traj.mean_state(), rtol=0, atol=0)


def test_return_last_and_keep_beyond_steps_run() -> None:
    """return_best=False gives the last iterate; a kept step beyond the last one run gives
    the frozen last iterate."""
    fn: Map = lambda z: 0.5 * z + 1.0  # noqa: E731
    z0 = torch.zeros(2, 3, dtype=D64)
    solver = FixedPointIteration(threshold=40, tol=1e-3, return_best=False)
    traj = solver.solve(fn, z0, keep={35})
    ref = solver.solve(fn, z0, keep=True)
    N = ref.num_steps
    assert N < 35
    torch.testing.assert_close(traj.state(35), ref.state(N), rtol=0, atol=0)
    torch.testing.assert_close(traj.final, ref.state(N), rtol=0, atol=0)


def test_nfe_counts_evaluations() -> None:
    traj = FixedPointIteration(threshold=7, tol=0.0).solve(
        lambda z: 0.5 * z + 1, torch.zeros(1, 2, dtype=D64)
    )
    assert traj.nfe == 8  # f(z_0) .. f(z_7)
    assert traj.num_steps == 7


# --- 10. bad settings and inputs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Broyden(threshold=0), ValueError, "threshold must be at least 1"),
        (lambda: Broyden(threshold=1.5), TypeError, "threshold must be an int"),
        (lambda: Anderson(threshold=True), TypeError, "threshold must be an int"),
        (lambda: Broyden(tol=-1e-3), ValueError, "tol must be a finite number >= 0"),
        (lambda: Broyden(tol=float("nan")), ValueError, "tol must be a finite number"),
        (lambda: Broyden(stop_mode="foo"), ValueError, "unknown stop_mode 'foo'.*'abs'.*'rel'"),
        (lambda: Broyden(alpha=0.0), ValueError, "alpha must be > 0"),
        (lambda: Broyden(alpha=-1.0), ValueError, "alpha must be > 0"),
        (lambda: Anderson(memory=0), ValueError, "memory must be an int >= 1"),
        (lambda: Anderson(beta=0.0), ValueError, r"beta must be in \(0, 1\]"),
        (lambda: Anderson(lam=0.0), ValueError, "lam must be > 0"),
        (lambda: FixedPointIteration(damping=1.5), ValueError, r"damping must be in \(0, 1\]"),
        (lambda: FixedPointIteration(damping=0.0), ValueError, r"damping must be in \(0, 1\]"),
    ],
)
def test_bad_settings_raise(make: Callable[[], Solver], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_stop_mode_string_is_accepted() -> None:
    assert Broyden(stop_mode="abs").stop_mode is StopMode.ABS


@pytest.mark.parametrize(
    "solver",
    [Broyden(threshold=5), Anderson(threshold=5), FixedPointIteration(threshold=5)],
    ids=["Broyden", "Anderson", "FixedPointIteration"],
)
def test_bad_solve_inputs_raise(solver: Solver) -> None:
    fn: Map = lambda z: 0.5 * z  # noqa: E731
    with pytest.raises(ValueError, match=r"z0 must be a \(batch, dim\) tensor, got \(4,\)"):
        solver.solve(fn, torch.zeros(4))
    with pytest.raises(ValueError, match=r"z0 must be a \(batch, dim\) tensor"):
        solver.solve(fn, torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="z0 must be floating point, got torch.int64"):
        solver.solve(fn, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="z0 contains NaN or inf"):
        solver.solve(fn, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"cannot keep steps \[6, 9\]: valid steps are 1..5"):
        solver.solve(fn, torch.zeros(2, 3), keep={2, 6, 9})
    with pytest.raises(ValueError, match=r"cannot keep steps \[0\]"):
        solver.solve(fn, torch.zeros(2, 3), keep={0})
    with pytest.raises(ValueError, match=r"f returned shape \(2, 4\)"):
        solver.solve(lambda z: torch.zeros(2, 4), torch.zeros(2, 3))
