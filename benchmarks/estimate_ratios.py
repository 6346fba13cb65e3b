"""The ratios of issue 16.2, measured in one run and written to a JSON file:

- ``Adjoint(n=N) / Unrolled(n=N, k=1)`` by ``DEQEstimator.loss_gradient`` (the benchmark's
  ``adjoint_vs_unrolled`` row), with and without ``reuse_forward``;
- ART's ``ProjectedGradientDescent`` (PGD-10 through ``loss_gradient``) / the same PGD run
  directly on ``input_gradient``, for ``Exact`` and ``Adjoint``;
- ``DEQEstimator.loss_gradient`` / ``input_gradient`` for one call (the estimator's own
  per-call cost).

The small workload of ``benchmarks.workloads`` (a 16-channel conv DEQ, batch 64 x 3 x 32 x 32,
Broyden with 8 iterates and tol 0). Each ratio is the median over many short interleaved
pairs (one call per side per repeat, the order alternating), so that a machine shared with
other jobs biases neither side; the quartiles show the spread.

    python -m benchmarks.estimate_ratios --repeats 41 --out benchmarks/results/estimate_ratios.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.timing import paired_ratio
from benchmarks.workloads import workloads
from deq_attacks import Adjoint, Broyden, DEQEstimator, Exact, Unrolled
from deq_attacks.deq import DEQModel
from deq_attacks.gradients import GradientEstimate, input_gradient, loss_cotangent

EPS, EPS_STEP, PGD_STEPS, N = 8 / 255, 2 / 255, 10, 8


def pgd(deq: DEQModel, estimate: GradientEstimate, x: Tensor, y: Tensor) -> Tensor:
    """L-inf PGD-10 with a uniform random start, on ``input_gradient`` directly."""
    cotangent = loss_cotangent(nn.CrossEntropyLoss(), y)
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0.0, 1.0)
    for _ in range(PGD_STEPS):
        grad = input_gradient(deq, estimate, x_adv, cotangent)
        x_adv = torch.minimum(torch.maximum(x_adv + EPS_STEP * grad.sign(), x - EPS), x + EPS)
        x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv


def ratio(
    numerator: Callable[[], object], denominator: Callable[[], object], repeats: int
) -> dict[str, float]:
    timing = paired_ratio(
        numerator,
        denominator,
        device=torch.device("cpu"),
        repeats=repeats,
        warmup=2,
        min_block_s=0.0,
        clock="cpu",
    )
    ratios = sorted(timing.ratios)
    return {
        "ratio": timing.ratio,
        "q1": ratios[len(ratios) // 4],
        "q3": ratios[(3 * len(ratios)) // 4],
        "numerator_ms": timing.numerator_s * 1e3,
        "denominator_ms": timing.denominator_s * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--pgd-repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("estimate_ratios.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    workload = workloads(False)["small"]
    deq = workload.model(torch.device("cpu"), solver=Broyden(threshold=N, tol=0.0))
    x, y = workload.batch_data(torch.device("cpu"))
    one_hot = nn.functional.one_hot(y, workload.num_classes).to(torch.float32)

    def estimator(estimate: GradientEstimate) -> DEQEstimator:
        return DEQEstimator(
            deq, input_shape=workload.input_shape, nb_classes=workload.num_classes,
            estimate=estimate, device_type="cpu",
        )  # fmt: skip

    def grad_of(est: DEQEstimator) -> Callable[[], object]:
        return lambda: est.loss_gradient(x, one_hot)

    def direct(estimate: GradientEstimate) -> Callable[[], object]:
        cotangent = loss_cotangent(nn.CrossEntropyLoss(), y)
        return lambda: input_gradient(deq, estimate, x, cotangent)

    def art_pgd(estimate: GradientEstimate) -> Callable[[], object]:
        from art.attacks.evasion import ProjectedGradientDescent

        attack = ProjectedGradientDescent(
            estimator(estimate), norm=np.inf, eps=EPS, eps_step=EPS_STEP, max_iter=PGD_STEPS,
            num_random_init=1, batch_size=len(x), verbose=False,
        )  # fmt: skip
        x_np, y_np = x.numpy(), y.numpy()
        return lambda: attack.generate(x_np, y_np)

    def plain_pgd(estimate: GradientEstimate) -> Callable[[], object]:
        return lambda: pgd(deq, estimate, x, y)

    unrolled = grad_of(estimator(Unrolled(n=N, k=1)))
    pairs = {
        "adjoint_vs_unrolled": (grad_of(estimator(Adjoint(n=N))), unrolled, args.repeats),
        "adjoint_reuse_vs_unrolled": (
            grad_of(estimator(Adjoint(n=N, reuse_forward=True))), unrolled, args.repeats
        ),
    }
    cheap: dict[str, GradientEstimate] = {"unrolled": Unrolled(k=1), "adjoint": Adjoint()}
    for label, estimate in cheap.items():
        pairs[f"loss_gradient_vs_input_gradient_{label}"] = (
            grad_of(estimator(estimate)), direct(estimate), args.repeats
        )
    attacked: dict[str, GradientEstimate] = {"exact": Exact(), "adjoint": Adjoint()}
    for label, estimate in attacked.items():
        pairs[f"art_pgd_{label}"] = (art_pgd(estimate), plain_pgd(estimate), args.pgd_repeats)
    rows = {}
    for label, (numerator, denominator, repeats) in pairs.items():
        rows[label] = ratio(numerator, denominator, repeats)
        print(label, {k: round(v, 3) for k, v in rows[label].items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": workload.description, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
