"""Gradient ensemble over intermediate states (Eq. 17), from one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deq_attacks.gradients.base import (
    BackwardPass,
    GradientEstimate,
    PerStepEstimate,
    StepWeights,
)
from deq_attacks.gradients.registry import register_estimate
from deq_attacks.solvers import Solver, Trajectory


@register_estimate("ensemble")
@dataclass(frozen=True)
class GradientEnsemble(GradientEstimate):
    """Mean over n of the per-step estimates ``of`` at ``n = 1..N_i`` (each sample's own
    iterates), from the one trajectory of the forward pass.

    ``GradientEnsemble(Adjoint(beta=0.5))`` costs one adjoint sweep (as ``Adjoint(n=N)`` does);
    ``GradientEnsemble(Unrolled(k=1, lam=1.0))`` and ``GradientEnsemble(AdjointBroyden())``
    cost one unrolling or one VJP per step.

    Args:
        of: the per-step estimate (Adjoint, Unrolled, AdjointBroyden or any PerStepEstimate),
            with ``n`` left None.
    """

    of: PerStepEstimate

    def __post_init__(self) -> None:
        if not isinstance(self.of, PerStepEstimate):
            raise TypeError(
                "GradientEnsemble(of=...) takes a per-step estimate (Adjoint, Unrolled or "
                f"AdjointBroyden), got {self.of!r}"
            )
        if self.of.n is not None:
            raise ValueError(
                f"GradientEnsemble averages over every step n; leave n unset in {self.of!r}"
            )

    def check(self, solver: Solver) -> None:
        self.of.check(solver)

    @property
    def reuses_forward(self) -> bool:
        return self.of.reuses_forward

    def keep_steps(self, threshold: int) -> bool:
        return True

    @staticmethod
    def step_weights(trajectory: Trajectory) -> StepWeights:
        """Per-sample weights ``1/N_i`` for steps ``n <= N_i`` (0 beyond a sample's own steps)."""
        steps = trajectory.steps
        inverse_count = 1.0 / steps.clamp(min=1).to(trajectory.z0.dtype)
        return {
            n: torch.where(steps >= n, inverse_count, torch.zeros_like(inverse_count))
            for n in range(1, trajectory.num_steps + 1)
        }

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        return self.of.weighted(backward, self.step_weights(backward.trajectory))
