"""One PGD-AT step of the training loop (the default torch PGD with the training gradient in
eval mode, then the training step) with the phantom gradient against one with the exact one."""

from __future__ import annotations

import functools

from benchmarks.cases.common import EPS, EPS_STEP, Bounds, Context, Row, full_solver, timed_row
from deq_attacks import Broyden, ImplicitGradient, PhantomGradient
from deq_attacks.acceleration import Acceleration
from deq_attacks.training import loop as training_loop
from deq_attacks.training.adversary import Budget, make_adversary
from deq_attacks.training.build import TrainingModule, optimizer_and_schedule
from deq_attacks.training.presets import PAPER

BOUNDS: Bounds = (
    (
        ("pgd_at_phantom_vs_exact",),
        "A PGD-AT step is PGD-10 (ten input gradients through the training gradient, in eval "
        "mode) and one training step: the adversary dominates, so the "
        "ratio follows the per-estimate cost of Phantom(k) against Exact (its backward solve). "
        "Samples/s in the notes are batch / step time; the paper's 35.4 (phantom) and 28.3 "
        "(exact 8/7) samples/s are DEQ-Large on an RTX 3090 with batch 96 (Table 10).",
    ),
)


def run(ctx: Context) -> list[Row]:
    s = ctx.settings
    n = s.threshold
    x, y = ctx.workload.batch_data(ctx.device)
    gradients = {
        "phantom": PhantomGradient(k=s.phantom_k, lam=s.phantom_lam),
        "exact": ImplicitGradient(backward_solver=full_solver(Broyden, s.backward_threshold)),
    }
    steps = {}
    for name, gradient in gradients.items():
        deq = ctx.workload.model(
            ctx.device, solver=full_solver(Broyden, n), training_gradient=gradient
        )
        optimizer, schedule = optimizer_and_schedule(deq, PAPER, total_steps=10_000)
        adversary = make_adversary(
            "torch", deq, Budget(EPS, EPS_STEP, s.pgd_steps, True),
            ctx.workload.input_shape, ctx.workload.num_classes, ctx.device, len(x),
        )  # fmt: skip
        step_ctx = training_loop.StepContext(
            TrainingModule(deq, depth=n),
            deq,
            optimizer,
            schedule,
            adversary,
            ctx.workload.num_classes,
            ctx.device,
            Acceleration(),
        )
        steps[name] = functools.partial(training_loop.training_step, step_ctx, x, y, True, False)
    row = timed_row(
        ctx,
        "pgd_at_phantom_vs_exact",
        f"PGD-AT step: phantom (k={s.phantom_k}) / exact ({n}/{s.backward_threshold})",
        None,
        steps["phantom"],
        steps["exact"],
        f"deq_attacks.training.loop.training_step on batch {len(x)}: torch PGD-{s.pgd_steps} "
        "(random start, eval mode, the training gradient) then the Adam step",
        "paper Table 10 (DEQ-Large, batch 96, RTX 3090): phantom 35.4, exact (8/7) 28.3 "
        "samples/s, time ratio 0.80",
    )
    phantom_rate, exact_rate = len(x) / row.numerator, len(x) / row.denominator
    row.notes += f"; measured phantom {phantom_rate:.2f}, exact {exact_rate:.2f} samples/s"
    return [row]
