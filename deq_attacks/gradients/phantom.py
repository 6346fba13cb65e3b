"""The unrolling-based phantom gradient at the solver's answer (Eq. 4-6)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deq_attacks.gradients.base import BackwardPass, GradientEstimate, unrolled_injection_gradient
from deq_attacks.gradients.registry import register_estimate
from deq_attacks.numerics import check_unroll


@register_estimate("phantom")
@dataclass(frozen=True)
class Phantom(GradientEstimate):
    """Autograd through ``k`` damped steps ``z <- (1-lam) z + lam f(z; x)`` from the detached
    ``z*``; loss at the last one. Cost: k forward and k backward steps of f."""

    k: int = 5
    lam: float = 0.5

    def __post_init__(self) -> None:
        check_unroll(self.k, self.lam)

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        return unrolled_injection_gradient(backward, backward.trajectory.final, self.k, self.lam)
