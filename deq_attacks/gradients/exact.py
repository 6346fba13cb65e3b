"""The exact implicit gradient (Eq. 2-3) at the solver's answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deq_attacks.gradients.base import BackwardPass, GradientEstimate
from deq_attacks.gradients.registry import register_estimate
from deq_attacks.numerics import head_gradient, implicit_state
from deq_attacks.solvers import Broyden, Solver, Trajectory


@register_estimate("exact")
@dataclass(frozen=True)
class Exact(GradientEstimate):
    """``(df(z*; x)/dx)^T u*`` where ``u* = J_f(z*)^T u* + dL/dz*`` is solved by
    ``backward_solver`` (its own threshold). Works in eval mode. Cost: the forward solve plus
    one backward solve of ``threshold`` vector-Jacobian products. The adjoint solve and its
    VJP are those of the training gradient ``ImplicitGradient``
    (``deq_attacks.numerics.implicit_state``), with the forcing ``dL/dz*`` taken at ``z*``.

    Args:
        backward_solver: the solver of the adjoint system.
        on_backward: called with each backward solve's Trajectory (per-sample residuals,
            convergence), e.g. ``records.append``; not part of the repr, equality or spec.
    """

    backward_solver: Solver = field(default_factory=lambda: Broyden(threshold=30, tol=1e-6))
    on_backward: Callable[[Trajectory], object] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.backward_solver, Solver):
            raise TypeError(f"backward_solver must be a Solver, got {self.backward_solver!r}")

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        deq, injection = backward.deq, backward.injection
        z_star = backward.trajectory.final
        forcing = head_gradient(lambda z: deq.logits(z, injection), z_star, backward.cotangent)
        with torch.enable_grad():
            inj = injection.detach().requires_grad_()
            z_out = implicit_state(self.backward_solver, deq.step, z_star, inj, self.on_backward)
            (grad,) = torch.autograd.grad(z_out, inj, forcing)
        return grad
