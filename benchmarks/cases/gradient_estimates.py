"""Ensemble and single-step estimates, and Adjoint(n) against Unrolled(n, k=1), by loss_gradient;
with the ratio's floor modelled from the measured cost of its parts."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from benchmarks.cases.common import (
    Bounds,
    Context,
    Result,
    Row,
    estimator,
    full_run_note,
    full_solver,
    loss_gradient_call,
    ms,
    one_hot,
    timed_row,
)
from benchmarks.timing import time_once
from deq_attacks import DEQ, Adjoint, Broyden, GradientEnsemble, GradientEstimate, Unrolled

BOUNDS: Bounds = (
    (
        ("ensemble_adjoint",),
        "The adjoint ensemble (Eq. 17) is one sweep over the trajectory, like Adjoint(n=N); it "
        "only adds the injection-gradient term at every step.",
    ),
    (
        ("ensemble_unrolled",),
        "Unrolled estimates share no work between steps: the ensemble pays one unrolling "
        "(f forward, VJP, head) per state on top of the shared forward solve.",
    ),
    (
        ("adjoint_vs_unrolled",),
        "Adjoint(n) runs n sequential steps of Eq. 9-10, each a VJP through f and through the "
        "head at z_m (u_m needs u_{m-1}, so they cannot be batched); Unrolled(n, k=1) runs one. "
        "With S the forward solve and c one such step the ratio is about (S + n c) / (S + c): "
        "it nears 1 only where the forward solve dominates. `reuse_forward` takes the VJPs "
        "through the forward solve's own graphs of f (no f forward per step), at the price of "
        "recording them during the solve.",
    ),
    (
        ("adjoint_floor",),
        "The ratio Adjoint(n) / Unrolled(n, k=1) would have if each did only its necessary "
        "work, from the parts timed alone in the same run: (S + n (f + VJP_z + head)) / "
        "(S + f + VJP_x + head), with S the forward solve, f + VJP_z one forward of f and its "
        "VJP into z (one adjoint step; the products with B_m^T are left out), head one head "
        "forward + VJP (the adjoint needs the forcing term dL(z_m)/dz at every step: n of "
        "them; stacked into one call they cost less only where the device runs them in "
        "parallel, a GPU), f + VJP_x the unrolling step's forward and VJP into the injection. "
        "Adjoint's measured ratio cannot be below it; how far above it shows the overhead.",
    ),
)


def run(ctx: Context) -> list[Row]:
    n = ctx.settings.threshold
    deq = ctx.workload.model(ctx.device, solver=full_solver(Broyden, n))
    x, y = ctx.workload.batch_data(ctx.device)
    y1 = one_hot(y, ctx.workload.num_classes)
    est = estimator(ctx, deq)

    def grad(estimate: GradientEstimate) -> Callable[[], object]:
        return loss_gradient_call(est, estimate, x, y1)

    grad(Adjoint())()
    full = full_run_note(deq, n)
    how = f"DEQEstimator.loss_gradient (ART entry point), Broyden({n} iterates), batch {len(x)}"
    return [
        timed_row(
            ctx,
            "ensemble_adjoint",
            "GradientEnsemble(Adjoint) / Adjoint(n=N)",
            1.5,
            grad(GradientEnsemble(Adjoint())),
            grad(Adjoint(n=n)),
            f"{how}; ensemble over all N={n} states vs the estimate at z_N",
            f"naive ensemble (one estimate per state) would be ~N={n}; {full}",
        ),
        timed_row(
            ctx,
            "ensemble_unrolled",
            "GradientEnsemble(Unrolled(k=1)) / Unrolled(n=N, k=1)",
            None,
            grad(GradientEnsemble(Unrolled(k=1))),
            grad(Unrolled(n=n, k=1)),
            f"{how}; one k=1 unrolling per state vs one at z_N",
            f"reported only: its naive cost is N={n} unrollings (shared forward solve); {full}",
        ),
        timed_row(
            ctx,
            "adjoint_vs_unrolled",
            "Adjoint(n) / Unrolled(n, k=1)",
            1.4,
            grad(Adjoint(n=n)),
            grad(Unrolled(n=n, k=1)),
            f"{how}; n=N={n}",
            f"paper App. F.2: 1.21 (PGD-10 on DEQ-Large); {full}",
        ),
        timed_row(
            ctx,
            "adjoint_reuse_vs_unrolled",
            "Adjoint(n, reuse_forward=True) / Unrolled(n, k=1)",
            1.4,
            grad(Adjoint(n=n, reuse_forward=True)),
            grad(Unrolled(n=n, k=1)),
            f"{how}; n=N={n}; the forward solve records f's graphs",
            full,
        ),
        adjoint_floor(ctx, deq, x, n),
    ]


def adjoint_floor(ctx: Context, deq: DEQ, x: torch.Tensor, n: int) -> Result:
    """The modelled floor of ``adjoint_vs_unrolled`` from its parts, timed alone (see
    BOUNDS)."""
    injection = deq.inject(x).detach()
    with torch.no_grad():
        z = deq.solve(injection).final
    z_leaf = z.clone().requires_grad_()
    inj_leaf = injection.clone().requires_grad_()

    def solve() -> object:
        with torch.no_grad():
            return deq.solve(injection)

    def vjp(of: torch.Tensor, into: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.enable_grad():
                fz = deq.step(of, inj_leaf if into is inj_leaf else injection)
            return torch.autograd.grad(fz, into, torch.ones_like(fz))

        return call

    def head() -> object:
        with torch.enable_grad():
            logits = deq.logits(z_leaf, injection)
        return torch.autograd.grad(logits, z_leaf, torch.ones_like(logits))

    def median(call: Callable[[], object]) -> float:
        call()
        times = [time_once(call, ctx.device, clock=ctx.settings.clock) for _ in range(5)]
        return statistics.median(times)

    s_, step_z, step_x, h = (
        median(solve),
        median(vjp(z_leaf, z_leaf)),
        median(vjp(z.detach(), inj_leaf)),
        median(head),
    )
    adjoint = s_ + n * (step_z + h)
    unrolled = s_ + step_x + h
    return Result(
        id="adjoint_floor",
        ratio="modelled floor of Adjoint(n) / Unrolled(n, k=1) from its parts",
        measured=adjoint / unrolled,
        target=None,
        workload=ctx.workload.name,
        timed=f"the parts alone: forward solve (Broyden {n}), f + VJP into z, f + VJP into the "
        "injection, head + VJP",
        notes=f"S {ms(s_)}, f + VJP_z {ms(step_z)}, f + VJP_x {ms(step_x)}, head {ms(h)}; "
        f"floor = (S + {n} (f + VJP_z + head)) / (S + f + VJP_x + head)",
        numerator=adjoint,
        denominator=unrolled,
        unit="s",
    )
