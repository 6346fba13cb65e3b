"""What a solve costs beyond its evaluations of f: solve time / time spent inside f, same run."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.cases.common import Bounds, Context, Result, Row, full_solver, ms
from benchmarks.timing import time_inside
from deq_attacks import Anderson, Broyden, FixedPointIteration
from deq_attacks.solvers import FixedPointMap, Solver

TARGET = 1.25  # on the small workload; reported only on DEQ-Large

BOUNDS: Bounds = (
    (
        (
            "bookkeeping_broyden",
            "bookkeeping_broyden_keep",
            "bookkeeping_anderson",
            "bookkeeping_fixed_point",
        ),
        "Outside f, every step of every solver computes g = f(z) - z, the norms of g and f(z) "
        "(per-sample residuals, stopping, best iterate) and adds z to the ensemble's running "
        "sum: about eight (B, d) passes of memory, masked only once samples stop or diverge. "
        "Broyden adds one product with B_n and one with B_n^T (2 n (B, d) rows each at step "
        "n, so O(N^2 d) per solve) and about ten (B, d) passes for its update; Anderson one row "
        "of its Gram matrix and one mix over its window (memory rows each). These are "
        "memory-bound: they weigh most against a cheap f (the small conv DEQ: about 1.5 ms per "
        "evaluation of a batch of 64 states of 4096) and least against DEQ-Large's.",
    ),
    (
        ("bookkeeping_broyden_floor", "bookkeeping_anderson_floor"),
        "Each solver's own arithmetic with no bookkeeping at all: the same iteration and update "
        "(Broyden: z - p, g = f(z) - z, the products with B_n and B_n^T, the rank-one "
        "update; Anderson: g = f(z) - z, the new row of the residuals' Gram matrix, the "
        "bordered least-squares solve and the mix of its window) on preallocated buffers, but "
        "no residual norms, stopping, best iterate, skipped updates or kept states. It is what "
        "any such solver costs beyond f on this workload, so its bookkeeping row cannot be "
        "below it; the gap between the two is our per-sample bookkeeping.",
    ),
)


def run(ctx: Context) -> list[Row]:
    n = ctx.settings.threshold
    deq = ctx.workload.model(ctx.device)
    x, _ = ctx.workload.batch_data(ctx.device)
    with torch.no_grad():
        injection = deq.inject(x)
        z0 = deq.initial_state(injection).reshape(len(x), -1)

    def f(z: Tensor) -> Tensor:
        return deq.step(z, injection)

    cases: tuple[tuple[str, type[Solver], bool], ...] = (
        ("bookkeeping_broyden", Broyden, False),
        ("bookkeeping_broyden_keep", Broyden, True),
        ("bookkeeping_anderson", Anderson, False),
        ("bookkeeping_fixed_point", FixedPointIteration, False),
    )
    target = TARGET if ctx.workload.name == "small" else None
    on = f"on batch {len(x)} (state {z0.shape[1]}); the denominator is the time spent inside its "
    on += f"{n + 1} calls of f in the same run"
    specs: list[_Spec] = []
    for id_, cls, keep in cases:
        solver = full_solver(cls, n)
        kept = "every iterate kept" if keep else "no iterate kept"

        def solve(fn: FixedPointMap, solver: Solver = solver, keep: bool = keep) -> object:
            return solver.solve(fn, z0, keep=keep)

        specs.append(
            _Spec(
                id_,
                f"{cls.__name__} solve / its f evaluations" + (" (keep=True)" if keep else ""),
                target,
                f"{cls.__name__}(threshold={n}, tol=0).solve (no grad, {kept}) of deq.step {on}",
                solve,
            )
        )
    floors: tuple[tuple[str, str, str, Callable[[FixedPointMap, Tensor, int], Tensor]], ...] = (
        ("bookkeeping_broyden_floor", "Broyden", "preallocated factors", bare_broyden),
        ("bookkeeping_anderson_floor", "Anderson", "preallocated window of 5", bare_anderson),
    )
    for id_, name, buffers, bare in floors:

        def bare_solve(
            fn: FixedPointMap, bare: Callable[[FixedPointMap, Tensor, int], Tensor] = bare
        ) -> object:
            return bare(fn, z0, n)

        specs.append(
            _Spec(
                id_,
                f"bare {name} iteration / its f evaluations (the floor of the {name} row)",
                None,
                f"{n} steps of {name}'s arithmetic alone ({bare.__name__}: {buffers}, no "
                f"bookkeeping) of deq.step {on}",
                bare_solve,
            )
        )
    return _interleaved_rows(ctx, specs, f)


def bare_broyden(f: FixedPointMap, z0: Tensor, steps: int) -> Tensor:
    """``steps`` iterates of Broyden's good method from ``z0`` (B, d) with alpha 1 and no
    bookkeeping (the floor of ``bookkeeping_broyden``): no residuals, stopping, best iterate
    or skipped updates. Returns the last iterate."""
    with torch.no_grad():
        U = z0.new_empty(steps, *z0.shape)  # step-major, as the solver stores them
        V = z0.new_empty(steps, *z0.shape)
        z, g = z0, f(z0) - z0
        p = -g  # B_0 g_0
        for n in range(steps):
            z = z - p
            g_new = f(z) - z
            Un, Vn = U[:n].transpose(0, 1), V[:n].transpose(0, 1)  # (B, n, d)
            g_row, p_row = g_new.unsqueeze(1), p.unsqueeze(1)
            q = torch.baddbmm(g_row, torch.bmm(g_row, Vn.transpose(1, 2)), Un, beta=-1)[:, 0]
            w = torch.baddbmm(p_row, torch.bmm(p_row, Un.transpose(1, 2)), Vn, beta=-1)[:, 0]
            dg = g_new - g
            U[n] = q / -(w * dg).sum(dim=-1, keepdim=True)
            V[n] = w
            p = q + U[n] * (V[n] * g_new).sum(dim=-1, keepdim=True)
            g = g_new
    return z


def bare_anderson(f: FixedPointMap, z0: Tensor, steps: int, memory: int = 5) -> Tensor:
    """``steps`` iterates of Anderson acceleration (type II, beta 1, the solver's default
    regularisation) from ``z0`` (B, d) with no bookkeeping (the floor of
    ``bookkeeping_anderson``): no residual norms, stopping or best iterate. Returns the last
    iterate."""
    lam = Anderson.lam
    with torch.no_grad():
        batch = z0.shape[0]
        F = z0.new_empty(batch, memory, z0.shape[1])  # f(z_i) in ring order
        G = torch.empty_like(F)  # g_i = f(z_i) - z_i
        gram = z0.new_zeros(batch, memory, memory)
        border = z0.new_ones(batch, memory + 1, memory + 1)
        border[:, 0, 0] = 0
        rhs = z0.new_zeros(batch, memory + 1, 1)
        rhs[:, 0] = 1
        z = z0
        for n in range(steps + 1):
            slot, k = n % memory, min(n + 1, memory)
            fz = f(z)
            F[:, slot] = fz
            torch.sub(fz, z, out=G[:, slot])
            row = torch.bmm(G[:, slot].unsqueeze(1), G[:, :k].transpose(1, 2)).squeeze(1)
            gram[:, slot, :k] = row
            gram[:, :k, slot] = row
            if n == steps:
                break
            system = border[:, : k + 1, : k + 1].clone()
            system[:, 1:, 1:] = gram[:, :k, :k]
            scale = gram[:, :k, :k].diagonal(dim1=1, dim2=2).mean(dim=-1).clamp(min=1e-30)
            system[:, 1:, 1:].diagonal(dim1=1, dim2=2).add_((lam * scale)[:, None])
            weights = torch.linalg.solve(system, rhs[:, : k + 1])[:, 1:].transpose(1, 2)
            z = torch.bmm(weights, F[:, :k]).squeeze(1)
    return z


@dataclass(frozen=True)
class _Spec:
    """One row to time: ``solve(f)`` against the time inside its calls of f."""

    id: str
    ratio: str
    target: float | None
    timed: str
    solve: Callable[[FixedPointMap], object]


def _interleaved_rows(ctx: Context, specs: Sequence[_Spec], f: FixedPointMap) -> list[Row]:
    """Every row timed ``repeats`` times, interleaved: each repetition runs every solve once,
    the order rotated from repetition to repetition, so that a drift of the process's state
    (the allocator's layout of the same tensors can change f's own speed by a third) weighs on
    every row alike instead of on whichever ran first."""
    s = ctx.settings
    for spec in specs:
        for _ in range(s.warmup):
            time_inside(spec.solve, f, ctx.device, s.clock)
    samples: dict[str, list[tuple[float, float]]] = {spec.id: [] for spec in specs}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for repeat in range(s.repeats):
            shift = repeat % len(specs)
            for spec in [*specs[shift:], *specs[:shift]]:
                samples[spec.id].append(time_inside(spec.solve, f, ctx.device, s.clock))
    finally:
        if gc_was_enabled:
            gc.enable()
    return [_row(ctx, spec, samples[spec.id]) for spec in specs]


def _row(ctx: Context, spec: _Spec, samples: Sequence[tuple[float, float]]) -> Result:
    """One row from its (solve seconds, seconds inside f) samples."""
    ratios = [total / inside for total, inside in samples]
    total = statistics.median(t for t, _ in samples)
    inside = statistics.median(i for _, i in samples)
    return Result(
        id=spec.id,
        ratio=spec.ratio,
        measured=statistics.median(ratios),
        target=spec.target,
        workload=ctx.workload.name,
        timed=spec.timed,
        notes=f"{'' if spec.target else 'reported only; '}{ms(total)} per solve, {ms(inside)} "
        f"inside f; per-repeat ratios {min(ratios):.3f}..{max(ratios):.3f}",
        numerator=total,
        denominator=inside,
        unit="s",
        samples=ratios,
    )
