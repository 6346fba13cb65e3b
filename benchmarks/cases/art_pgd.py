"""ART's ProjectedGradientDescent through DEQEstimator against the same PGD in plain torch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.cases.common import (
    EPS,
    EPS_STEP,
    Bounds,
    Context,
    Row,
    estimator,
    full_solver,
    timed_row,
)
from deq_attacks import DEQ, Adjoint, Broyden, DEQEstimator, GradientEstimate, Unrolled
from deq_attacks.gradients import input_gradient, loss_cotangent

TARGET = 1.1  # issue 16.2, for both estimates

BOUNDS: Bounds = (
    (
        ("art_pgd_unrolled", "art_pgd_adjoint"),
        "ART's PGD `generate` computes its success rate (two `predict`s of the batch: two "
        "forward solves) for a log line whether or not logging is on; per step it adds only "
        "its own tensor work (NaN check, sign, projection, clipping; `DEQEstimator."
        "loss_gradient` computes the estimate alone, no defended logits). The cheaper the "
        "estimate, the more the two predicts weigh.",
    ),
    (
        ("art_pgd_floor_unrolled", "art_pgd_floor_adjoint"),
        "The plain PGD followed by the two predicts that ART's `generate` always makes "
        "(`compute_success` on the clean and the adversarial batch): what any use of ART's PGD "
        "costs, so the ART PGD row of the same estimate cannot be below it.",
    ),
)


def plain_pgd(
    deq: DEQ, estimate: GradientEstimate, x: Tensor, y: Tensor, steps: int, loss: nn.Module
) -> Tensor:
    """L-inf PGD (eps 8/255, step 2/255, uniform random start) by ``estimate``, in plain torch."""
    cotangent = loss_cotangent(loss, y)
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = input_gradient(deq, estimate, x_adv, cotangent)
        x_adv = torch.minimum(torch.maximum(x_adv + EPS_STEP * grad.sign(), x - EPS), x + EPS)
        x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv


def run(ctx: Context) -> list[Row]:
    from art.attacks.evasion import ProjectedGradientDescent

    s = ctx.settings
    n = s.threshold
    deq = ctx.workload.model(ctx.device, solver=full_solver(Broyden, n))
    x, y = ctx.workload.batch_data(ctx.device)
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
    loss = nn.CrossEntropyLoss()
    rows: list[Row] = []
    for id_, label, estimate in (
        ("art_pgd_unrolled", "Unrolled(k=1)", Unrolled(k=1)),
        ("art_pgd_adjoint", "Adjoint(beta=0.5)", Adjoint()),
    ):
        est = estimator(ctx, deq, estimate=estimate)
        attack = ProjectedGradientDescent(
            est,
            norm=np.inf,
            eps=EPS,
            eps_step=EPS_STEP,
            max_iter=s.pgd_steps,
            num_random_init=1,
            batch_size=len(x_np),
            verbose=False,
        )

        def art_call(attack: ProjectedGradientDescent = attack) -> object:
            return attack.generate(x_np, y_np)

        def plain_call(estimate: GradientEstimate = estimate) -> object:
            return plain_pgd(deq, estimate, x, y, s.pgd_steps, loss)

        def plain_and_predicts(
            estimate: GradientEstimate = estimate, est: DEQEstimator = est
        ) -> object:
            x_adv = plain_pgd(deq, estimate, x, y, s.pgd_steps, loss)
            est.predict(x_np, batch_size=len(x_np))  # as compute_success does
            return est.predict(x_adv.cpu().numpy(), batch_size=len(x_np))

        rows.append(
            timed_row(
                ctx,
                id_,
                f"ART PGD-{s.pgd_steps} / plain torch PGD-{s.pgd_steps}, {label} at z_N",
                TARGET,
                art_call,
                plain_call,
                f"ProjectedGradientDescent(eps 8/255, step 2/255, {s.pgd_steps} steps, random "
                f"start).generate on numpy vs a torch loop of input_gradient with the same "
                f"estimate; Broyden({n}), batch {len(x)}",
                "ART adds its own tensor work per step and after the attack two predicts for "
                "its success-rate log",
            )
        )
        rows.append(
            timed_row(
                ctx,
                id_.replace("art_pgd", "art_pgd_floor"),
                f"plain torch PGD-{s.pgd_steps} + ART's two success-rate predicts / plain torch "
                f"PGD-{s.pgd_steps}, {label} at z_N (the floor of the ART PGD row)",
                None,
                plain_and_predicts,
                plain_call,
                f"the torch loop of input_gradient, then DEQEstimator.predict of the clean and "
                f"the adversarial batch, vs the loop alone; Broyden({n}), batch {len(x)}",
                "reported only",
            )
        )
    return rows
