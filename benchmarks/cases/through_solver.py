"""Backprop through the solver (plain and checkpointed) against Unrolled(n=N, k=1) and
Adjoint(n=N), by loss_gradient: time and peak memory."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.cases.common import (
    Bounds,
    Context,
    Result,
    Row,
    estimator,
    full_run_note,
    full_solver,
    loss_gradient_call,
    median_peak,
    mib,
    one_hot,
    timed_row,
)
from deq_attacks import Adjoint, BackpropThroughSolver, Broyden, GradientEstimate, Unrolled

BOUNDS: Bounds = ()


def run(ctx: Context) -> list[Row]:
    n = ctx.settings.threshold
    deq = ctx.workload.model(ctx.device, solver=full_solver(Broyden, n))
    x, y = ctx.workload.batch_data(ctx.device)
    y1 = one_hot(y, ctx.workload.num_classes)
    est = estimator(ctx, deq)
    bptt, recomputed = BackpropThroughSolver(), BackpropThroughSolver(checkpoint=True)
    unrolled, adjoint = Unrolled(n=n, k=1), Adjoint(n=n)

    def grad(estimate: GradientEstimate) -> Callable[[], object]:
        return loss_gradient_call(est, estimate, x, y1)

    grad(bptt)()
    full = full_run_note(deq, n)
    how = f"DEQEstimator.loss_gradient, Broyden({n} iterates, tol=0), batch {len(x)}"
    rows: list[Row] = [
        timed_row(
            ctx,
            id_,
            f"BackpropThroughSolver({label}) / {other}",
            None,
            grad(numerator),
            grad(denominator),
            f"{how}; the forward solve again with autograd, then one backward through its "
            f"{n} steps, vs the estimate at z_N",
            f"reported only; {full}",
        )
        for id_, label, numerator, other, denominator in (
            ("bptt_vs_unrolled", "", bptt, f"Unrolled(n={n}, k=1)", unrolled),
            ("bptt_vs_adjoint", "", bptt, f"Adjoint(n={n})", adjoint),
            (
                "bptt_checkpoint_vs_unrolled",
                "checkpoint=True",
                recomputed,
                f"Unrolled(n={n}, k=1)",
                unrolled,
            ),
        )
    ]
    base = median_peak(ctx, grad(unrolled))
    for name, label, estimate, why in (
        ("bptt", "BackpropThroughSolver()", bptt, "keeps every step's activations: O(N)"),
        (
            "bptt_checkpoint",
            "BackpropThroughSolver(checkpoint=True)",
            recomputed,
            "keeps the solver's own states per step, recomputes f's activations",
        ),
        ("adjoint", f"Adjoint(n={n})", adjoint, "keeps Broyden's factors and u_m"),
    ):
        value = median_peak(ctx, grad(estimate))
        rows.append(
            Result(
                id=f"memory_{name}_vs_unrolled",
                ratio=f"peak memory, {label} / Unrolled(n={n}, k=1)",
                measured=value / base,
                target=None,
                workload=ctx.workload.name,
                timed=f"{how}: one call each",
                notes=f"reported only: {mib(value)} vs {mib(base)}; {why}",
                numerator=float(value),
                denominator=float(base),
                unit="bytes",
            )
        )
    return rows
