"""The simultaneous adjoint (Sec. 4.1, Eq. 9-11) and the adjoint-Broyden baseline (App. D)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deq_attacks.gradients.base import (
    BackwardPass,
    PerStepEstimate,
    StepWeights,
    check_step,
    check_within,
    head_gradient,
    weighted_sum,
)
from deq_attacks.solvers import Solver, Trajectory


class InverseEstimate(enum.Enum):
    """Which ``B_m ~ (J_f - I)^{-1}`` the adjoint update uses."""

    BROYDEN = "broyden"  # the forward Broyden solve's own estimates (needs a Broyden solver)
    NEGATIVE_IDENTITY = "negative_identity"  # B_m = -I: damped fixed-point adjoint, any solver


def _check_inverse(inverse: InverseEstimate, solver: Solver, name: str) -> None:
    if not isinstance(inverse, InverseEstimate):
        raise TypeError(f"inverse must be an InverseEstimate, got {inverse!r}")
    if inverse is InverseEstimate.BROYDEN and not solver.keeps_inverse:
        remedy = (
            "use a Broyden solver, or ask for inverse=InverseEstimate.NEGATIVE_IDENTITY"
            if name == "Adjoint"
            else "use a Broyden solver"
        )
        raise ValueError(
            f"{name} reuses Broyden's inverse estimates B_n, but {type(solver).__name__} keeps "
            f"none: {remedy}"
        )


def _inverse_operator(
    trajectory: Trajectory, inverse: InverseEstimate, transpose: bool
) -> Callable[[int, Tensor], Tensor]:
    """``(m, v) -> B_m^T v`` (or ``B_m v``); steps past the last update reuse the last B."""
    if inverse is InverseEstimate.NEGATIVE_IDENTITY:
        return lambda m, v: -v
    factors = trajectory.inverse
    if factors is None:
        raise ValueError("this trajectory carries no inverse estimate B_n (not a Broyden solve)")
    apply = factors.rmatvec if transpose else factors.matvec
    return lambda m, v: apply(min(m, factors.num_updates), v)


def adjoint_sweep(
    backward: BackwardPass,
    beta: float,
    inverse: InverseEstimate,
    transpose: bool,
    weights: StepWeights,
) -> Tensor:
    """``sum_n weights[n] * (df(z_n; x)/d inj)^T u_n`` from ONE pass over the trajectory.

    ``u_0 = 0``; ``v_m = J_f(z_m)^T u_m + dL(z_m)/dz - u_m``; ``u_{m+1} = u_m - beta B_m^T v_m``
    (``B_m v_m`` when ``transpose`` is False: the paper's literal Eq. 10). Each step costs one
    forward of f and the head with autograd and one backward; the term for step n comes out of
    the same backward as ``J_f(z_n)^T u_n``.
    """
    deq, trajectory, cotangent = backward.deq, backward.trajectory, backward.cotangent
    injection = backward.injection
    last = max(weights)
    apply_inverse = _inverse_operator(trajectory, inverse, transpose)
    inj = injection.detach().requires_grad_()
    u = torch.zeros_like(trajectory.z0)
    total = torch.zeros_like(injection)
    for m in range(last + 1):
        update = m < last
        outputs: list[Tensor] = []
        grad_outputs: list[Tensor] = []
        inputs: list[Tensor] = []
        with torch.enable_grad():
            z_leaf = trajectory.state(m).detach().requires_grad_()
            if m > 0:  # u_0 = 0 contributes nothing
                outputs.append(deq.step(z_leaf, inj))
                grad_outputs.append(u)
            if update:
                logits = deq.logits(z_leaf, inj)
                outputs.append(logits)
                grad_outputs.append(cotangent(logits))
                inputs.append(z_leaf)
            if m in weights:
                inputs.append(inj)
            grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
        if m in weights:
            grad_inj = grads[-1] if grads[-1] is not None else torch.zeros_like(injection)
            weight = weights[m].to(injection.dtype).reshape(-1, *[1] * (injection.dim() - 1))
            total = total + weight * grad_inj
        if update:
            vjp_plus_forcing = grads[0]
            assert vjp_plus_forcing is not None
            v = vjp_plus_forcing - u
            u = u - beta * apply_inverse(m, v)
    return total


def _check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"beta (adjoint step size) must be in (0, 1], got {beta!r}")


@dataclass(frozen=True)
class Adjoint(PerStepEstimate):
    """Simultaneous adjoint state ``u_n`` paired with ``z_n``: ``(df(z_n; x)/dx)^T u_n`` (Eq. 11).

    Args:
        n: the step, 1..threshold; None for the last (``threshold``). Inside ``GradientEnsemble``
            leave it None.
        beta: step size in (0, 1]; ``u_n -> u*`` on contractive DEQs for beta < 1 (Remark 4.1).
        inverse: Broyden's ``B_m`` (default) or ``-I``.
        transpose: True applies ``B_m^T`` (consistent with the transposed system, the
            default); False applies ``B_m`` as Eq. 10 is printed, for comparison.
    """

    n: int | None = None
    beta: float = 0.5
    inverse: InverseEstimate = InverseEstimate.BROYDEN
    transpose: bool = True

    def __post_init__(self) -> None:
        check_step(self.n, "Adjoint")
        _check_beta(self.beta)
        if not isinstance(self.inverse, InverseEstimate):
            raise TypeError(f"inverse must be an InverseEstimate, got {self.inverse!r}")

    def step_index(self, threshold: int) -> int:
        return threshold if self.n is None else self.n

    def check(self, solver: Solver) -> None:
        check_within(self.n, solver, "Adjoint")
        _check_inverse(self.inverse, solver, "Adjoint")

    def keep_steps(self, threshold: int) -> frozenset[int]:
        return frozenset(range(1, self.step_index(threshold) + 1))

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        n = self.step_index(backward.trajectory.threshold)
        ones = torch.ones(backward.injection.shape[0], device=backward.injection.device)
        return self.weighted(backward, {n: ones})

    def weighted(self, backward: BackwardPass, weights: StepWeights) -> Tensor:
        """Weighted sum of the per-step estimates, in one sweep."""
        return adjoint_sweep(backward, self.beta, self.inverse, self.transpose, weights)


@dataclass(frozen=True)
class AdjointBroyden(PerStepEstimate):
    """The adjoint-Broyden baseline (SHINE, Appendix D): ``u = -B^T dL(z)/dz`` from an inverse
    estimate alone, then ``(df(z; x)/dx)^T u``.

    Args:
        n: use ``z_n`` and ``B_n``; None for the solver's answer ``z*`` with the final ``B_N``.
    """

    n: int | None = None

    def __post_init__(self) -> None:
        check_step(self.n, "AdjointBroyden")

    def check(self, solver: Solver) -> None:
        check_within(self.n, solver, "AdjointBroyden")
        _check_inverse(InverseEstimate.BROYDEN, solver, "AdjointBroyden")

    def keep_steps(self, threshold: int) -> frozenset[int]:
        return frozenset() if self.n is None else frozenset({self.n})

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        trajectory = backward.trajectory
        if self.n is None:
            factors = trajectory.inverse
            steps = factors.num_updates if factors is not None else 0
            return self.gradient_at(steps, trajectory.final, backward)
        return self.gradient_at(self.n, trajectory.state(self.n), backward)

    def weighted(self, backward: BackwardPass, weights: StepWeights) -> Tensor:
        state = backward.trajectory.state
        return weighted_sum(backward, weights, lambda n: self.gradient_at(n, state(n), backward))

    def gradient_at(self, n: int, z: Tensor, backward: BackwardPass) -> Tensor:
        """The estimate at state ``z`` with inverse estimate ``B_n``."""
        deq, injection = backward.deq, backward.injection
        apply_inverse = _inverse_operator(
            backward.trajectory, InverseEstimate.BROYDEN, transpose=True
        )
        u = -apply_inverse(n, head_gradient(deq, z, injection, backward.cotangent))
        with torch.enable_grad():
            inj = injection.detach().requires_grad_()
            fz = deq.step(z.detach(), inj)
            (grad,) = torch.autograd.grad(fz, inj, u)
        return grad
