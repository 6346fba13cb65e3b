"""Our Broyden solve against torchdeq 0.1.0's broyden_solver on the same f, batch, iterations."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.cases.common import Bounds, Context, Row, full_solver, timed_row
from deq_attacks import Broyden

BOUNDS: Bounds = (
    (
        ("broyden_vs_torchdeq",),
        "Beyond the N+1 evaluations of f, a Broyden step of ours costs one product with B_n "
        "and one with B_n^T (torchdeq: three) and per-sample bookkeeping (residuals, stopping, "
        "divergence, best iterate, the running sum of the ensemble defense).",
    ),
)


def run(ctx: Context) -> list[Row]:
    from torchdeq.solver import get_solver

    n = ctx.settings.threshold
    deq = ctx.workload.model(ctx.device)
    x, _ = ctx.workload.batch_data(ctx.device)
    with torch.no_grad():
        injection = deq.inject(x)
        z0 = deq.initial_state(injection).reshape(len(x), -1)
    calls = [0]

    def fn(z: Tensor) -> Tensor:
        calls[0] += 1
        return deq.step(z, injection)

    ours = full_solver(Broyden, n)
    torchdeq_broyden = get_solver("broyden")

    def ours_call() -> Tensor:
        return ours.solve(fn, z0).final

    def torchdeq_call() -> Tensor:
        with torch.no_grad():
            z_star, _, _ = torchdeq_broyden(fn, z0, max_iter=n, tol=0.0, stop_mode="rel")
        return z_star

    calls[0] = 0
    ours_final = ours_call()
    ours_nfe = calls[0]
    calls[0] = 0
    theirs_final = torchdeq_call()
    theirs_nfe = calls[0]
    diff = float((ours_final - theirs_final).norm() / theirs_final.norm().clamp(min=1e-30))
    return [
        timed_row(
            ctx,
            "broyden_vs_torchdeq",
            "our Broyden / torchdeq 0.1.0 broyden_solver",
            1.0,
            ours_call,
            torchdeq_call,
            f"Broyden(threshold={n}, tol=0).solve vs torchdeq broyden_solver(max_iter={n}, "
            f"tol=0, stop_mode='rel', no line search) on the same flat f (B, d), batch {len(x)}",
            f"f evaluations {ours_nfe} vs {theirs_nfe}; answers differ by {diff:.1e} (relative); "
            "ours also keeps per-sample residuals, stopping, divergence and the B_n factors",
        )
    ]
