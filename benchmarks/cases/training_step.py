"""One optimizer step with the phantom training gradient against one with the exact one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.cases.common import Bounds, Context, Row, full_run_note, full_solver, timed_row
from deq_attacks import DEQ, Broyden, ImplicitGradient, PhantomGradient
from deq_attacks.solvers import Trajectory

BOUNDS: Bounds = (
    (
        ("train_phantom_vs_exact",),
        "Both share the forward solve. Phantom: k forward steps of f with autograd and their "
        "backward into the state and the parameters. Exact: two evaluations of f with "
        "autograd, a backward Broyden solve of (threshold + 1) VJPs into the state only (no "
        "weight-gradient convolutions) and one backward into the parameters. Where the "
        "weight gradients cost as much as the state gradients (DEQ-Large) the exact step is "
        "the cheaper one. The paper's 0.80 (Table 10) was measured with its own code on a GPU.",
    ),
)


def run(ctx: Context) -> list[Row]:
    s = ctx.settings
    n = s.threshold
    x, y = ctx.workload.batch_data(ctx.device)
    backward_solves: list[Trajectory] = []
    phantom = ctx.workload.model(
        ctx.device,
        solver=full_solver(Broyden, n),
        training_gradient=PhantomGradient(k=s.phantom_k, lam=s.phantom_lam),
    )
    exact = ctx.workload.model(
        ctx.device,
        solver=full_solver(Broyden, n),
        training_gradient=ImplicitGradient(
            backward_solver=full_solver(Broyden, s.backward_threshold),
            on_backward=backward_solves.append,
        ),
    )

    def step_of(deq: DEQ) -> Callable[[], object]:
        optimizer = torch.optim.Adam(deq.parameters(), lr=1e-3)

        def step() -> object:
            deq.train()
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(deq(x), y)
            loss.backward()
            optimizer.step()
            return loss

        return step

    phantom_step, exact_step = step_of(phantom), step_of(exact)
    exact_step()
    backward_note = (
        f"exact backward ran {backward_solves[-1].num_steps} iterates" if backward_solves else ""
    )
    return [
        timed_row(
            ctx,
            "train_phantom_vs_exact",
            f"phantom ({n} forward, k={s.phantom_k}) / exact ({n}/{s.backward_threshold}) "
            "training step",
            0.85,
            phantom_step,
            exact_step,
            f"Adam step (forward + backward + step) on batch {len(x)}: PhantomGradient(k="
            f"{s.phantom_k}, lam={s.phantom_lam}) vs ImplicitGradient(Broyden(threshold="
            f"{s.backward_threshold}, tol=0)), both Broyden({n}, tol=0) forward",
            f"paper Table 10: 28.3/35.4 samples/s = 0.80; {full_run_note(exact, n)}; "
            f"{backward_note}",
        )
    ]
