"""Unrolled intermediates (Sec. 4.2, Eq. 13-16): the phantom gradient started at z_n."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deq_attacks.gradients.base import (
    BackwardPass,
    PerStepEstimate,
    StepWeights,
    unrolled_injection_gradient,
    weighted_sum,
)
from deq_attacks.gradients.registry import register_estimate
from deq_attacks.gradients.sweep_family import (
    SweepFamily,
    SweepParameter,
    register_sweep_family,
    step_parameter,
)
from deq_attacks.numerics import check_step, check_unroll, check_within
from deq_attacks.solvers import Solver


@register_estimate("unrolled")
@dataclass(frozen=True)
class Unrolled(PerStepEstimate):
    """Autograd through ``k`` damped steps from the detached intermediate ``z_n``.

    Args:
        n: the iterate to unroll, 1..threshold; None for the last one (``z_threshold``).
            Inside ``GradientEnsemble`` leave it None.
        k: unrolling steps >= 1 (paper's ablation: k=1, lam=1 on z_1 is strongest).
        lam: damping in (0, 1].
    """

    n: int | None = None
    k: int = 1
    lam: float = 1.0

    def __post_init__(self) -> None:
        check_step(self.n, "Unrolled")
        check_unroll(self.k, self.lam)

    def step_index(self, threshold: int) -> int:
        return threshold if self.n is None else self.n

    def check(self, solver: Solver) -> None:
        check_within(self.n, solver, "Unrolled")

    def keep_steps(self, threshold: int) -> frozenset[int]:
        return frozenset({self.step_index(threshold)})

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        return self.gradient_at(self.step_index(backward.trajectory.threshold), backward)

    def weighted(self, backward: BackwardPass, weights: StepWeights) -> Tensor:
        return weighted_sum(backward, weights, lambda n: self.gradient_at(n, backward))

    def gradient_at(self, n: int, backward: BackwardPass) -> Tensor:
        """The estimate unrolled from ``z_n``."""
        return unrolled_injection_gradient(backward, backward.trajectory.state(n), self.k, self.lam)


UNROLLED_FAMILY = register_sweep_family(
    SweepFamily(
        "unrolled",
        Unrolled,
        (
            step_parameter(),
            SweepParameter("k", int, "1,2,5", check=lambda k: check_unroll(k, 1.0)),
            SweepParameter("lam", float, "0.5,1.0", check=lambda lam: check_unroll(1, lam)),
        ),
    )
)
"""``Unrolled(n, k, lam)`` over every n, k in {1, 2, 5} and lambda in {0.5, 1} (Fig. 3)."""
