"""Training gradients: how the solver's answer re-enters autograd (Sec. 2.1)."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deq_attacks.solvers import Broyden, Solver, Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.contract import DEQModel
    from deq_attacks.gradients.base import GradientEstimate

StepFn = Callable[[Tensor], Tensor]


def damped_unroll(step: StepFn, z_start: Tensor, k: int, lam: float) -> Tensor:
    """``z_t = (1 - lam) z_{t-1} + lam step(z_{t-1})`` for t = 1..k from ``z_start`` (Eq. 6/16)."""
    z = z_start
    for _ in range(k):
        z = (1 - lam) * z + lam * step(z)
    return z


def check_unroll(k: int, lam: float) -> None:
    """Validate unrolling steps ``k >= 1`` and damping ``lam`` in (0, 1]."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (unrolling steps) must be an int >= 1, got {k!r}")
    if not isinstance(lam, (int, float)) or not 0 < lam <= 1:
        raise ValueError(f"lambda (damping) must be in (0, 1], got {lam!r}")


def solve_adjoint(solver: Solver, fz: Tensor, z_leaf: Tensor, forcing: Tensor) -> Trajectory:
    """The solve of ``u = J_f(z)^T u + forcing`` (B, d) from ``u_0 = 0``, where ``fz = f(z_leaf)``
    carries the graph to ``z_leaf``; ``u*`` is its ``final``. A diverged sample is reported."""

    def adjoint_map(u: Tensor) -> Tensor:
        (vjp,) = torch.autograd.grad(fz, z_leaf, u, retain_graph=True)
        return vjp + forcing

    trajectory = solver.solve(adjoint_map, torch.zeros_like(forcing))
    if trajectory.diverged.any():
        count = int(trajectory.diverged.sum())
        warnings.warn(f"adjoint (backward) solve diverged for {count} sample(s)", stacklevel=3)
    return trajectory


class TrainingGradient(ABC):
    """Maps the detached solver answer ``z*`` (B, d) to a state whose autograd graph carries
    this gradient to the parameters and the injection. Under ``torch.no_grad`` it is just the
    forward map, so the model's output does not depend on the grad mode."""

    @abstractmethod
    def attach(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        """The output state (B, d)."""

    @abstractmethod
    def attack_estimate(self) -> GradientEstimate:
        """The attack-side estimate equal to this gradient: PGD-AT makes its adversaries with
        the gradient it trains with (Appendix A)."""

    @abstractmethod
    def forward_state(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        """The output state (B, d) as ``attach`` computes it, differentiable in ``z_star`` and
        ``injection`` by plain autograd (no gradient substituted, ``z_star`` not detached)."""


@dataclass(frozen=True)
class ImplicitGradient(TrainingGradient):
    """The exact implicit gradient (Eq. 2-3), in train and eval mode.

    Output ``f(z*)``; its backward replaces the incoming cotangent ``c`` by ``u*`` solving
    ``u = J_f(z*)^T u + c`` with ``backward_solver`` (its own threshold), then continues into
    ``f``'s parameters and injection.

    Args:
        backward_solver: the solver of the adjoint system.
        on_backward: called with the backward solve's Trajectory after each backward, to
            inspect it (e.g. ``records.append``); None: nothing is kept.
    """

    backward_solver: Solver = field(default_factory=lambda: Broyden(threshold=7, tol=1e-4))
    on_backward: Callable[[Trajectory], object] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.backward_solver, Solver):
            raise TypeError(f"backward_solver must be a Solver, got {self.backward_solver!r}")

    def attack_estimate(self) -> GradientEstimate:
        from deq_attacks.gradients.exact import Exact

        return Exact(self.backward_solver)

    def forward_state(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return deq.step(z_star, injection)

    def attach(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        z_star = z_star.detach()
        z_out = self.forward_state(deq, z_star, injection)
        if not z_out.requires_grad:
            return z_out
        z_leaf = z_star.clone().requires_grad_()
        f_leaf = deq.step(z_leaf, injection.detach())
        solver, on_backward = self.backward_solver, self.on_backward

        def implicit(cotangent: Tensor) -> Tensor:
            trajectory = solve_adjoint(solver, f_leaf, z_leaf, cotangent)
            if on_backward is not None:
                on_backward(trajectory)
            return trajectory.final

        z_out.register_hook(implicit)
        return z_out


@dataclass(frozen=True)
class PhantomGradient(TrainingGradient):
    """The unrolling-based phantom gradient (Eq. 4-6): ``k`` damped steps from ``z*``, autograd
    through them. Paper training: k=5, lambda=0.5."""

    k: int = 5
    lam: float = 0.5

    def __post_init__(self) -> None:
        check_unroll(self.k, self.lam)

    def attack_estimate(self) -> GradientEstimate:
        from deq_attacks.gradients.phantom import Phantom

        return Phantom(self.k, self.lam)

    def forward_state(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return damped_unroll(lambda z: deq.step(z, injection), z_star, self.k, self.lam)

    def attach(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return self.forward_state(deq, z_star.detach(), injection)
