"""The exact implicit gradient (Eq. 2-3) at the solver's answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deq_attacks.deq.backward import solve_adjoint
from deq_attacks.gradients.base import BackwardPass, GradientEstimate, head_gradient
from deq_attacks.solvers import Broyden, Solver, Trajectory


@dataclass(frozen=True)
class Exact(GradientEstimate):
    """``(df(z*; x)/dx)^T u*`` where ``u* = J_f(z*)^T u* + dL/dz*`` is solved by
    ``backward_solver`` (its own threshold). Works in eval mode. Cost: the forward solve plus
    one backward solve of ``threshold`` vector-Jacobian products.

    Args:
        backward_solver: the solver of the adjoint system.
        on_backward: called with each backward solve's Trajectory (per-sample residuals,
            convergence), e.g. ``records.append``; not part of the repr or of equality.
    """

    backward_solver: Solver = field(default_factory=lambda: Broyden(threshold=30, tol=1e-6))
    on_backward: Callable[[Trajectory], object] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.backward_solver, Solver):
            raise TypeError(f"backward_solver must be a Solver, got {self.backward_solver!r}")

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        deq, injection, cotangent = backward.deq, backward.injection, backward.cotangent
        z_star = backward.trajectory.final
        forcing = head_gradient(deq, z_star, injection, cotangent)
        with torch.enable_grad():
            z_leaf = z_star.detach().requires_grad_()
            inj = injection.detach().requires_grad_()
            fz = deq.step(z_leaf, inj)
            adjoint = solve_adjoint(self.backward_solver, fz, z_leaf, forcing)
            if self.on_backward is not None:
                self.on_backward(adjoint)
            (grad,) = torch.autograd.grad(fz, inj, adjoint.final)
        return grad
