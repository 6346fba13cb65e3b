"""What a gradient estimate is, and the two cotangent sources that drive it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deq_attacks.solvers import Solver, Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.model import DEQ

Cotangent = Callable[[Tensor], Tensor]
"""Maps logits (B, classes) computed at a surrogate state to dL/dlogits (B, classes)."""


def loss_cotangent(loss: Callable[[Tensor, Tensor], Tensor], labels: Tensor) -> Cotangent:
    """Loss-aware consumer: dL/dlogits of ``loss(logits, labels)`` at each surrogate state."""

    def cotangent(logits: Tensor) -> Tensor:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss(logits, labels), logits, retain_graph=True)
        return grad

    return cotangent


def constant_cotangent(grad: Tensor) -> Cotangent:
    """Autograd consumer: the cotangent of the defended logits, used straight-through."""
    return lambda logits: grad.to(logits.dtype)


class GradientEstimate(ABC):
    """An estimate of dL/dx for a DEQ: computes dL/d(injection) from one forward trajectory.

    The gradient w.r.t. the input follows by one vector-Jacobian product through the
    injection (see ``input_gradient``).
    """

    def check(self, solver: Solver) -> None:
        """Raise if this estimate cannot be computed over ``solver``'s trajectories."""
        return None

    def keep_steps(self, threshold: int) -> bool | frozenset[int]:
        """Which iterates the forward solve must keep (True: all)."""
        return frozenset()

    @abstractmethod
    def injection_gradient(
        self, deq: DEQ, trajectory: Trajectory, injection: Tensor, cotangent: Cotangent
    ) -> Tensor:
        """The estimate of dL/d(injection), shaped like ``injection``."""


def input_gradient(
    deq: DEQ,
    estimate: GradientEstimate,
    x: Tensor,
    cotangent: Cotangent,
    trajectory: Trajectory | None = None,
) -> Tensor:
    """dL/dx (shaped like x) by ``estimate``, solving the forward pass unless given."""
    estimate.check(deq.solver)
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_()
        injection = deq.inject(x_leaf)
        if trajectory is None:
            keep = estimate.keep_steps(deq.solver.threshold)
            trajectory = deq.solve(injection.detach(), keep=keep)
        grad_injection = estimate.injection_gradient(deq, trajectory, injection.detach(), cotangent)
        (grad_x,) = torch.autograd.grad(injection, x_leaf, grad_injection)
    return grad_x


def check_step(n: int | None, name: str) -> None:
    """Validate an intermediate step index ``n >= 1`` (or None for the last iterate)."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}(n) needs an int n >= 1 (or None for the last), got {n!r}")


def check_within(n: int | None, solver: Solver, name: str) -> None:
    """Raise if step ``n`` is beyond the iterates ``solver`` can produce."""
    if n is not None and n > solver.threshold:
        raise ValueError(
            f"{name}(n={n}) is beyond the solver's threshold of {solver.threshold} iterates"
        )


def head_gradient(deq: DEQ, z: Tensor, injection: Tensor, cotangent: Cotangent) -> Tensor:
    """dL(head(z))/dz (B, d) with dL/dlogits from ``cotangent``."""
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        logits = deq.logits(z_leaf, injection)
        (grad,) = torch.autograd.grad(logits, z_leaf, cotangent(logits))
    return grad


def unrolled_injection_gradient(
    deq: DEQ, z_start: Tensor, injection: Tensor, cotangent: Cotangent, k: int, lam: float
) -> Tensor:
    """dL/d(injection) through ``k`` damped steps from the detached ``z_start`` (Eq. 13-16)."""
    from deq_attacks.deq.backward import damped_unroll

    with torch.enable_grad():
        inj = injection.detach().requires_grad_()
        z = damped_unroll(lambda s: deq.step(s, inj), z_start.detach(), k, lam)
        logits = deq.logits(z, inj)
        (grad,) = torch.autograd.grad(logits, inj, cotangent(logits))
    return grad
