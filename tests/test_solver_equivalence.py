"""The solvers' bookkeeping equals a straightforward reference implementation of it.

The reference below is the bookkeeping as it was before it was optimised (masks with
``torch.where`` on every (B, d) tensor every step, fresh tensors, Broyden's three products
with ``B_n`` per step), written out plainly. On random problems with per-sample stopping at
different steps, samples that diverge (from the start and mid-run), samples frozen after
they stopped, every ``keep`` variant, ``return_best`` both ways and both stop modes, the
optimised solvers must make the same per-sample decisions (steps, converged, diverged:
exactly) and produce the same record: bitwise where the arithmetic is the same (fixed-point
iteration), within 1e-6 where it was regrouped (Broyden's products with ``B_n``, Anderson's
Gram matrix built one row per step).
Differentiable solves must also give the same gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import pytest
import torch
from torch import Tensor

from deq_attacks.solvers import (
    Anderson,
    Broyden,
    BroydenInverse,
    FixedPointIteration,
    Solver,
    StopMode,
    Trajectory,
)

D64 = torch.float64
Map = Callable[[Tensor], Tensor]


# --- the reference: the bookkeeping written plainly --------------------------------------------


class RefRecorder:
    """Per-sample bookkeeping with a mask on every tensor at every step."""

    def __init__(
        self, solver: Solver, fn: Map, z0: Tensor, keep: bool | Collection[int], diff: bool
    ) -> None:
        self.solver, self.fn, self.diff, self.nfe, self.z0 = solver, fn, diff, 0, z0
        batch = z0.shape[0]
        self.keep_all = keep is True
        self.keep_steps = frozenset() if isinstance(keep, bool) else frozenset(keep)
        fz0 = self.evaluate(z0)
        self.z, self.fz = z0, fz0
        finite = torch.isfinite(fz0).all(dim=-1)
        self.diverged, self.active = ~finite, finite.clone()
        self.converged = torch.zeros(batch, dtype=torch.bool)
        self.steps = torch.zeros(batch, dtype=torch.long)
        self.state_sum = torch.zeros_like(z0)
        self.states: dict[int, Tensor] = {}
        z, fz = z0.detach(), fz0.detach()
        self.abs_res = (fz - z).norm(dim=-1)
        self.rel_res = (fz - z).norm(dim=-1) / fz.norm(dim=-1).clamp(min=1e-12)
        self.abs_hist: list[Tensor] = []
        self.rel_hist: list[Tensor] = []
        self.best = z0
        self.best_crit = torch.full((batch,), math.inf, dtype=z0.dtype)

    def evaluate(self, z: Tensor) -> Tensor:
        if self.diff:
            z = torch.where(torch.isfinite(z).all(dim=-1, keepdim=True), z, 0.0)
        self.nfe += 1
        return self.fn(z)

    def record(self, n: int, z_new: Tensor, f_new: Tensor) -> Tensor:
        finite = torch.isfinite(z_new).all(dim=-1) & torch.isfinite(f_new).all(dim=-1)
        took = self.active & finite
        self.diverged |= self.active & ~finite
        col = took.unsqueeze(-1)
        self.z = torch.where(col, z_new, self.z)
        self.fz = torch.where(col, f_new, self.fz)
        z, fz = self.z.detach(), self.fz.detach()
        abs_res = (fz - z).norm(dim=-1)
        rel_res = (fz - z).norm(dim=-1) / fz.norm(dim=-1).clamp(min=1e-12)
        self.abs_res = torch.where(took, abs_res, self.abs_res)
        self.rel_res = torch.where(took, rel_res, self.rel_res)
        self.abs_hist.append(self.abs_res)
        self.rel_hist.append(self.rel_res)
        self.steps += took.long()
        self.state_sum = self.state_sum + torch.where(col, self.z, torch.zeros_like(self.z))
        crit = self.abs_res if self.solver.stop_mode is StopMode.ABS else self.rel_res
        better = took & (crit < self.best_crit)
        self.best = torch.where(better.unsqueeze(-1), self.z, self.best)
        self.best_crit = torch.where(better, crit, self.best_crit)
        now_converged = took & (crit <= self.solver.tol)
        self.converged |= now_converged
        self.active = took & ~now_converged
        if self.keep_all or n in self.keep_steps:
            self.states[n] = self.z
        return took

    def finish(self, inverse: BroydenInverse | None = None) -> Trajectory:
        num_steps = len(self.rel_hist)
        if any(n > num_steps for n in self.keep_steps):
            self.states[num_steps] = self.z
        final = self.best if self.solver.return_best else self.z
        final = torch.where((self.steps == 0).unsqueeze(-1), self.z, final)
        return Trajectory(
            z0=self.z0,
            final=final,
            residuals=torch.stack(self.rel_hist, dim=1),
            abs_residuals=torch.stack(self.abs_hist, dim=1),
            steps=self.steps,
            converged=self.converged,
            diverged=self.diverged,
            state_sum=self.state_sum,
            states=self.states,
            threshold=self.solver.threshold,
            nfe=self.nfe,
            inverse=inverse,
        )


def _apply(left: list[Tensor], right: list[Tensor], v: Tensor) -> Tensor:
    """``-v + sum_i left_i (right_i . v)``: B_n v (U, V) or B_n^T v (V, U)."""
    out = -v
    for a, b in zip(left, right):
        out = out + a * (b * v).sum(dim=-1, keepdim=True)
    return out


def ref_broyden(s: Broyden, rec: RefRecorder) -> Trajectory:
    us: list[Tensor] = []
    vs: list[Tensor] = []
    z, g = rec.z, rec.fz - rec.z
    for n in range(1, s.threshold + 1):
        dz = -s.alpha * _apply(us, vs, g)
        z_new = z + dz
        f_new = rec.evaluate(z_new)
        took = rec.record(n, z_new, f_new)
        dz = torch.where(took.unsqueeze(-1), dz, 0.0)
        dg = rec.fz - rec.z - g
        b_dg = _apply(us, vs, dg)
        bt_dz = _apply(vs, us, dz)
        denom = (bt_dz * dg).sum(dim=-1)
        denom_d = denom.detach()
        scale = dz.detach().norm(dim=-1) * b_dg.detach().norm(dim=-1)
        noise = 1e3 * torch.finfo(dg.dtype).eps * f_new.detach().norm(dim=-1)
        ok = took & torch.isfinite(denom_d) & (denom_d.abs() > 1e-6 * scale)
        ok &= (scale > 0) & (dg.detach().norm(dim=-1) > noise)
        safe = torch.where(ok, denom, torch.ones_like(denom)).unsqueeze(-1)
        keep = ok.unsqueeze(-1)
        us.append(torch.where(keep, (dz - b_dg) / safe, 0.0))
        vs.append(torch.where(keep, bt_dz, 0.0))
        z, g = rec.z, rec.fz - rec.z
        if not rec.active.any():
            break
    inverse = BroydenInverse(torch.stack(us, dim=2).detach(), torch.stack(vs, dim=1).detach())
    return rec.finish(inverse)


def ref_anderson(s: Anderson, rec: RefRecorder) -> Trajectory:
    batch, dim = rec.z0.shape
    xs = rec.z0.new_zeros(batch, s.memory, dim)
    fs = rec.z0.new_zeros(batch, s.memory, dim)
    xs[:, 0], fs[:, 0] = rec.z, rec.fz
    filled = 1
    for n in range(1, s.threshold + 1):
        k = min(filled, s.memory)
        gs = fs[:, :k] - xs[:, :k]
        system = rec.z0.new_zeros(batch, k + 1, k + 1)
        system[:, 0, 1:] = 1
        system[:, 1:, 0] = 1
        gram = torch.bmm(gs, gs.transpose(1, 2))
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=-1).clamp(min=1e-30)
        system[:, 1:, 1:] = gram + (s.lam * scale)[:, None, None] * torch.eye(k, dtype=D64)
        rhs = rec.z0.new_zeros(batch, k + 1, 1)
        rhs[:, 0] = 1
        weights = torch.linalg.solve(system, rhs)[:, 1:, 0]
        weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
        mix_f = torch.einsum("bk,bkd->bd", weights, fs[:, :k])
        mix_x = torch.einsum("bk,bkd->bd", weights, xs[:, :k])
        z_new = s.beta * mix_f + (1 - s.beta) * mix_x
        rec.record(n, z_new, rec.evaluate(z_new))
        slot = filled % s.memory
        xs, fs = xs.clone(), fs.clone()
        xs[:, slot], fs[:, slot] = rec.z, rec.fz
        filled += 1
        if not rec.active.any():
            break
    return rec.finish()


def ref_fixed_point(s: FixedPointIteration, rec: RefRecorder) -> Trajectory:
    for n in range(1, s.threshold + 1):
        z_new = (1 - s.damping) * rec.z + s.damping * rec.fz
        rec.record(n, z_new, rec.evaluate(z_new))
        if not rec.active.any():
            break
    return rec.finish()


def reference_solve(
    solver: Solver, fn: Map, z0: Tensor, keep: bool | Collection[int], diff: bool = False
) -> Trajectory:
    run = {Broyden: ref_broyden, Anderson: ref_anderson, FixedPointIteration: ref_fixed_point}
    with torch.enable_grad() if diff else torch.no_grad():
        return run[type(solver)](solver, RefRecorder(solver, fn, z0, keep, diff))  # type: ignore[operator]


# --- random problems ---------------------------------------------------------------------------


class Problem:
    """A batch of 9 per-sample maps on R^6 that exercise every per-sample decision.

    Samples 0-4 are ``c_i tanh(A_i z + b_i)`` (``||A_i||_2 = 0.9``): c = 0.1 is fast, 1.6
    (sample 3) slow, so samples stop at different steps. With ``diverging``, sample 1 is NaN
    from f(z_0) on and sample 2 gets inf from the third evaluation on (it diverges mid-run);
    without, every sample is active until the first one stops. Samples 5-8 are affine,
    ``A_i z + b_i``: 5 and 6 have ``A - I`` nearly skew (``S - eps I``, eps 1e-2 and 1e-9),
    so Broyden's first update has the relative denominator ~eps, made (1e-2) or skipped
    (1e-9); 7 has a non-normal A (transient growth: residuals that rise before they fall,
    so the lowest-residual iterate is not the last); 8 is a plain contraction.
    """

    def __init__(self, seed: int, diverging: bool = True, dim: int = 6) -> None:
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=D64)

        a = randn(9, dim, dim)
        self.A = 0.9 * a / torch.linalg.matrix_norm(a, ord=2)[:, None, None]
        eye = torch.eye(dim, dtype=D64)
        for i, eps in ((5, 1e-2), (6, 1e-9)):
            skew = a[i] - a[i].T
            self.A[i] = eye + 0.5 * skew / torch.linalg.matrix_norm(skew, ord=2) - eps * eye
        self.A[7] = 0.5 * eye + 2.0 * torch.diag(torch.ones(dim - 1, dtype=D64), 1)
        self.b = randn(9, dim)
        self.c = torch.tensor([0.1, 0.5, 0.8, 1.6, 0.3, 1, 1, 1, 1], dtype=D64)
        if diverging:
            self.c[1] = float("nan")
        self.tanh = torch.arange(9) < 5
        self.diverging = diverging
        self.z0 = 0.1 * randn(9, dim)
        self.calls = 0

    def __call__(self, z: Tensor) -> Tensor:
        affine = torch.einsum("bij,bj->bi", self.A, z) + self.b
        out = torch.where(self.tanh[:, None], self.c[:, None] * torch.tanh(affine), affine)
        self.calls += 1
        if self.diverging and self.calls >= 3:
            mask = torch.zeros_like(out, dtype=torch.bool)
            mask[2] = True
            out = torch.where(mask, torch.full_like(out, float("inf")), out)
        return out


SOLVERS: list[Solver] = [
    Broyden(threshold=14, tol=1e-7),
    Broyden(threshold=16, tol=0),  # converged samples run on: rounding-level updates skipped
    Broyden(threshold=14, tol=1e-5, alpha=0.7, stop_mode=StopMode.ABS),
    Broyden(threshold=10, tol=1e-6, return_best=False),
    Anderson(threshold=14, tol=1e-7),
    Anderson(threshold=16, tol=0),
    Anderson(threshold=14, tol=1e-5, memory=3, beta=0.6, stop_mode=StopMode.ABS),
    Anderson(threshold=10, tol=1e-6, return_best=False, lam=1e-3),
    FixedPointIteration(threshold=30, tol=1e-6),
    FixedPointIteration(threshold=30, tol=1e-4, damping=0.6, stop_mode=StopMode.ABS),
    FixedPointIteration(threshold=20, tol=1e-6, return_best=False),
]
KEEPS: list[bool | frozenset[int]] = [False, True, frozenset({2, 5}), frozenset({9})]


def assert_same(new: Tensor, ref: Tensor, bitwise: bool) -> None:
    """Bitwise equal (NaN where NaN), or per sample ``||new - ref|| <= 1e-6 ||ref||``."""
    if bitwise:
        torch.testing.assert_close(new, ref, rtol=0, atol=0, equal_nan=True)
        return
    assert torch.equal(torch.isnan(new), torch.isnan(ref))
    new, ref = torch.nan_to_num(new).flatten(1), torch.nan_to_num(ref).flatten(1)
    error = (new - ref).norm(dim=-1)
    assert (error <= 1e-6 * ref.norm(dim=-1) + 1e-300).all(), (error, ref.norm(dim=-1))


def assert_same_trajectory(new: Trajectory, ref: Trajectory, solver: Solver) -> None:
    """Same decisions exactly; same values bitwise for fixed-point iteration, else 1e-6
    relative per sample (Broyden and Anderson regroup their arithmetic)."""
    bitwise = isinstance(solver, FixedPointIteration)
    decided = torch.ones_like(ref.converged)
    if solver.tol == 0 and not bitwise:
        # tol=0 runs on into rounding noise, where the best step (and whether a residual
        # hits exactly 0) is the noise itself and depends on the CPU's vector width: the
        # decisions are compared for the samples that stay above it
        best = torch.nan_to_num(ref.residuals, nan=math.inf).amin(dim=1)
        decided = best > 1e-10
    assert torch.equal(new.steps[decided], ref.steps[decided]), (new.steps, ref.steps)
    assert torch.equal(new.converged[decided], ref.converged[decided])
    assert torch.equal(new.diverged, ref.diverged)
    assert new.nfe == ref.nfe and new.num_steps == ref.num_steps
    assert sorted(new.states) == sorted(ref.states)
    assert_same(new.final, ref.final, bitwise)
    # a sample that stopped one step apart in the noise summed one state more or less
    assert_same(new.state_sum[decided], ref.state_sum[decided], bitwise)
    for n in ref.states:
        assert_same(new.states[n], ref.states[n], bitwise)
    assert_same(new.residuals, ref.residuals, bitwise)
    assert_same(new.abs_residuals, ref.abs_residuals, bitwise)
    if isinstance(solver, Broyden):
        assert new.inverse is not None and ref.inverse is not None
        assert new.inverse.num_updates == ref.inverse.num_updates
        # B_n is compared while the updates are made of more than rounding errors: once a
        # sample's residual is ~1e-13 (tol=0 runs on), both are noise of the same size
        informative = torch.nan_to_num(ref.residuals, nan=0.0) > 1e-10
        for n in range(ref.inverse.num_updates + 1):
            rows = informative[:, : max(n, 1)].all(dim=1)
            assert_same(new.inverse.dense(n)[rows], ref.inverse.dense(n)[rows], bitwise=False)
    else:
        assert new.inverse is None


def _ids(solvers: list[Solver]) -> list[str]:
    return [repr(s) for s in solvers]


@pytest.mark.parametrize("keep", KEEPS, ids=["none", "all", "2,5", "9"])
@pytest.mark.parametrize("solver", SOLVERS, ids=_ids(SOLVERS))
@pytest.mark.parametrize("diverging", [True, False], ids=["diverging", "finite"])
@pytest.mark.parametrize("seed", [0, 1])
def test_no_grad_solve_equals_the_reference(
    solver: Solver, keep: bool | frozenset[int], diverging: bool, seed: int
) -> None:
    new = solver.solve(Problem(seed, diverging), Problem(seed, diverging).z0, keep=keep)
    ref = reference_solve(solver, Problem(seed, diverging), Problem(seed, diverging).z0, keep)
    # the problem exercises what it should: divergences, stops at several steps
    assert new.diverged.tolist()[1:3] == [diverging, diverging]
    if diverging:
        assert int(new.steps[1]) == 0 and int(new.steps[2]) == 1
    if solver.tol > 0:
        assert len(set(new.steps.tolist())) >= (3 if diverging else 2), new.steps
    if new.inverse is not None:  # Broyden's first update: skipped for sample 6, made for 5
        first = new.inverse.U[:, :, 0]
        assert (first[6] == 0).all() and (first[5] != 0).any()
    assert_same_trajectory(new, ref, solver)


@pytest.mark.parametrize("solver", SOLVERS, ids=_ids(SOLVERS))
def test_the_problem_has_samples_whose_best_iterate_is_not_the_last(solver: Solver) -> None:
    """So that the lowest-residual choice is exercised by the comparison above."""
    found = []
    for seed in (0, 1):
        t = solver.solve(Problem(seed, diverging=False), Problem(seed, diverging=False).z0)
        for i, n in enumerate(t.steps.tolist()):
            found.append(int(t.residuals[i, :n].argmin()) + 1 != n)
    assert any(found)


def test_every_sample_active_takes_the_unmasked_path() -> None:
    """With tol=0 and no divergence no sample ever stops: the record still equals the
    reference (the common case, where no masking is done at all)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, generator=gen, dtype=D64)
    A = 1.5 * a / torch.linalg.matrix_norm(a, ord=2)
    b = torch.randn(5, 8, generator=gen, dtype=D64)

    def fn(z: Tensor) -> Tensor:
        return torch.tanh(z @ A.T + b)

    z0 = torch.zeros(5, 8, dtype=D64)
    for solver in (Broyden(threshold=9, tol=0), Anderson(threshold=9, tol=0)):
        for keep in (False, True):
            new, ref = solver.solve(fn, z0, keep=keep), reference_solve(solver, fn, z0, keep)
            assert (new.steps == 9).all()
            assert_same_trajectory(new, ref, solver)
    solver = FixedPointIteration(threshold=9, tol=0)
    assert_same_trajectory(solver.solve(fn, z0), reference_solve(solver, fn, z0, False), solver)


DIFFERENTIABLE: list[Solver] = [
    Broyden(threshold=10, tol=1e-6),
    Broyden(threshold=10, tol=1e-5, alpha=0.7, stop_mode=StopMode.ABS),
    Broyden(threshold=8, tol=1e-6, return_best=False),
    Anderson(threshold=10, tol=1e-6),
    Anderson(threshold=10, tol=1e-5, memory=3, beta=0.6, stop_mode=StopMode.ABS),
    FixedPointIteration(threshold=20, tol=1e-5),
    FixedPointIteration(threshold=20, tol=1e-4, damping=0.6, return_best=False),
]


@pytest.mark.parametrize("solver", DIFFERENTIABLE, ids=_ids(DIFFERENTIABLE))
def test_differentiable_solve_equals_the_reference_and_its_gradient(solver: Solver) -> None:
    """Forward record and the gradient of the final state, a kept state and the running
    sum with respect to the map's parameters, against the reference's."""
    gen = torch.Generator().manual_seed(5)
    weights = torch.randn(6, 6, generator=gen, dtype=D64)
    weights = (0.9 * weights / torch.linalg.matrix_norm(weights, ord=2)).requires_grad_()
    shift = torch.randn(5, 6, generator=gen, dtype=D64).requires_grad_()
    c = torch.tensor([0.05, 0.95, 1.4, 0.3, 0.8], dtype=D64)
    z0 = 0.1 * torch.randn(5, 6, generator=gen, dtype=D64)

    def fn(z: Tensor) -> Tensor:
        return c[:, None] * torch.tanh(z @ weights.T + shift)

    def loss(t: Trajectory) -> Tensor:
        return (t.final**2).sum() + (t.state_sum * shift).sum() + t.states[3].sum()

    new = solver.solve(fn, z0, keep={3}, differentiable=True)
    ref = reference_solve(solver, fn, z0, {3}, diff=True)
    assert len(set(new.steps.tolist())) >= 2, new.steps
    assert_same_trajectory(new, ref, solver)
    got = torch.autograd.grad(loss(new), (weights, shift))
    want = torch.autograd.grad(loss(ref), (weights, shift))
    # only fixed-point iteration's backward runs the same arithmetic as the reference's
    bitwise = isinstance(solver, FixedPointIteration)
    for a, b in zip(got, want):
        assert_same(a.unsqueeze(0), b.unsqueeze(0), bitwise)
