"""What a solve costs beyond its evaluations of f: solve time / time spent inside f, same run."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

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
        ("bookkeeping_broyden_floor",),
        "Broyden's own arithmetic with no bookkeeping at all: the same iteration and update "
        "(z - p, g = f(z) - z, the products with B_n and B_n^T, the rank-one update) on "
        "preallocated factors, but no residual norms, stopping, best iterate, skipped updates "
        "or kept states. It is what any Broyden costs beyond f on this workload, so "
        "`bookkeeping_broyden` cannot be below it; the gap between the two is our per-sample "
        "bookkeeping.",
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
    rows: list[Row] = []
    for id_, cls, keep in cases:
        solver = full_solver(cls, n)
        kept = "every iterate kept" if keep else "no iterate kept"

        def solve(fn: FixedPointMap, solver: Solver = solver, keep: bool = keep) -> object:
            return solver.solve(fn, z0, keep=keep)

        rows.append(
            _row(
                ctx,
                id_,
                f"{cls.__name__} solve / its f evaluations" + (" (keep=True)" if keep else ""),
                target,
                f"{cls.__name__}(threshold={n}, tol=0).solve (no grad, {kept}) of deq.step {on}",
                solve,
                f,
            )
        )
    rows.append(
        _row(
            ctx,
            "bookkeeping_broyden_floor",
            "bare Broyden iteration / its f evaluations (the floor of the Broyden row)",
            None,
            f"{n} steps of Broyden's arithmetic alone (bare_broyden: preallocated factors, no "
            f"bookkeeping) of deq.step {on}",
            lambda fn: bare_broyden(fn, z0, n),
            f,
        )
    )
    return rows


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


def _row(
    ctx: Context,
    id_: str,
    ratio: str,
    target: float | None,
    timed: str,
    solve: Callable[[FixedPointMap], object],
    f: FixedPointMap,
) -> Result:
    """One row: ``solve(f)`` timed ``repeats`` times against the time inside its calls of f."""
    s = ctx.settings
    for _ in range(s.warmup):
        time_inside(solve, f, ctx.device, s.clock)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        samples = [time_inside(solve, f, ctx.device, s.clock) for _ in range(s.repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
    ratios = [total / inside for total, inside in samples]
    total = statistics.median(t for t, _ in samples)
    inside = statistics.median(i for _, i in samples)
    return Result(
        id=id_,
        ratio=ratio,
        measured=statistics.median(ratios),
        target=target,
        workload=ctx.workload.name,
        timed=timed,
        notes=f"{'' if target else 'reported only; '}{ms(total)} per solve, {ms(inside)} "
        f"inside f; per-repeat ratios {min(ratios):.3f}..{max(ratios):.3f}",
        numerator=total,
        denominator=inside,
        unit="s",
        samples=ratios,
    )
