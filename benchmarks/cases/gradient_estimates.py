"""Ensemble and single-step estimates, and Adjoint(n) against Unrolled(n, k=1), by loss_gradient."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.cases.common import (
    Bounds,
    Context,
    Row,
    estimator,
    full_run_note,
    full_solver,
    loss_gradient_call,
    one_hot,
    timed_row,
)
from deq_attacks import Adjoint, Broyden, GradientEnsemble, GradientEstimate, Unrolled

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
        "it nears 1 only where the forward solve dominates.",
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
            1.15,
            grad(Adjoint(n=n)),
            grad(Unrolled(n=n, k=1)),
            f"{how}; n=N={n}",
            f"paper App. F.2: 1.21 (PGD-10 on DEQ-Large); {full}",
        ),
    ]
