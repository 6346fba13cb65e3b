"""Training gradients: how the solver's answer re-enters autograd (Sec. 2.1)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from deq_attacks.numerics import check_unroll, damped_unroll, implicit_state
from deq_attacks.solvers import Broyden, Solver, Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.contract import DEQModel


class TrainingGradient(ABC):
    """Maps the detached solver answer ``z*`` (B, d) to a state whose autograd graph carries
    this gradient to the parameters and the injection. Under ``torch.no_grad`` it is just the
    forward map, so the model's output does not depend on the grad mode.

    The attack that uses the same gradient (PGD-AT's adversaries, the "ready-made" attack) is
    ``deq_attacks.gradients.ready_made(gradient)``; a new training gradient registers its
    attack estimate there (``ready_made.register``).
    """

    @abstractmethod
    def attach(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        """The output state (B, d)."""

    @abstractmethod
    def forward_state(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        """The output state (B, d) as ``attach`` computes it, differentiable in ``z_star`` and
        ``injection`` by plain autograd (no gradient substituted, ``z_star`` not detached)."""


@dataclass(frozen=True)
class ImplicitGradient(TrainingGradient):
    """The exact implicit gradient (Eq. 2-3), in train and eval mode.

    Output ``f(z*)``; its backward replaces the incoming cotangent ``c`` by ``u*`` solving
    ``u = J_f(z*)^T u + c`` with ``backward_solver`` (its own threshold), then continues into
    ``f``'s parameters and injection (``deq_attacks.numerics.implicit_state``).

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

    def forward_state(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return deq.step(z_star, injection)

    def attach(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return implicit_state(
            self.backward_solver, deq.step, z_star, injection, self.on_backward
        )


@dataclass(frozen=True)
class PhantomGradient(TrainingGradient):
    """The unrolling-based phantom gradient (Eq. 4-6): ``k`` damped steps from ``z*``, autograd
    through them. Paper training: k=5, lambda=0.5."""

    k: int = 5
    lam: float = 0.5

    def __post_init__(self) -> None:
        check_unroll(self.k, self.lam)

    def forward_state(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return damped_unroll(lambda z: deq.step(z, injection), z_star, self.k, self.lam)

    def attach(self, deq: DEQModel, z_star: Tensor, injection: Tensor) -> Tensor:
        return self.forward_state(deq, z_star.detach(), injection)
