"""The simultaneous adjoint (Sec. 4.1, Eq. 9-11) and the adjoint-Broyden baseline (App. D)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deq_attacks.gradients.base import BackwardPass, PerStepEstimate, StepWeights, weighted_sum
from deq_attacks.gradients.registry import register_estimate
from deq_attacks.gradients.sweep_family import (
    FamilyPlan,
    SweepFamily,
    SweepParameter,
    register_sweep_family,
    step_parameter,
)
from deq_attacks.numerics import (
    LogitsFn,
    check_step,
    check_within,
    head_gradient,
    head_gradients,
    stack_size,
)
from deq_attacks.solvers import Solver, Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.contract import DEQModel


class InverseEstimate(enum.Enum):
    """Which ``B_m ~ (J_f - I)^{-1}`` the adjoint update uses."""

    BROYDEN = "broyden"  # the forward Broyden solve's own estimates (needs a Broyden solver)
    NEGATIVE_IDENTITY = "negative_identity"  # B_m = -I: damped fixed-point adjoint, any solver

    def __repr__(self) -> str:
        """The value, as an estimate's repr (a column label) shows it: ``'broyden'``."""
        return repr(self.value)


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


def _stacked_logits(deq: DEQModel, injection: Tensor) -> LogitsFn:
    """The head on M*B stacked states (M*B, d), each chunk of B with the batch's injection."""
    batch = injection.shape[0]

    def logits(states: Tensor) -> Tensor:
        copies = states.shape[0] // batch
        if copies == 1:
            return deq.logits(states, injection)
        return deq.logits(states, injection.repeat(copies, *[1] * (injection.dim() - 1)))

    return logits


def adjoint_sweep(
    backward: BackwardPass,
    beta: float,
    inverse: InverseEstimate,
    transpose: bool,
    weights: StepWeights,
) -> Tensor:
    """``sum_n weights[n] * (df(z_n; x)/d inj)^T u_n`` from ONE pass over the trajectory.

    ``u_0 = 0``; ``v_m = J_f(z_m)^T u_m + dL(z_m)/dz - u_m``; ``u_{m+1} = u_m - beta B_m^T v_m``
    (``B_m v_m`` when ``transpose`` is False: the paper's literal Eq. 10). The forcing terms
    ``dL(z_m)/dz`` do not depend on u: where the device takes the stacked states
    (``numerics.stack_size``: on a GPU, or small states) all of them come from one head
    forward and one VJP; otherwise (large states on a CPU, where a stack beyond the caches is
    slower) each comes out of its step's backward. Each step costs one VJP of f at z_m
    (``J_f(z_m)^T u_m`` and, at a weighted step, the term for that step from the same VJP):
    with f evaluated again at z_m, or, where ``backward.evaluations`` holds the forward
    solve's own evaluation at exactly z_m, through that evaluation's graph.
    """
    deq, trajectory, cotangent = backward.deq, backward.trajectory, backward.cotangent
    injection, evaluations = backward.injection, backward.evaluations
    last = max(weights)
    apply_inverse = _inverse_operator(trajectory, inverse, transpose)
    head = _stacked_logits(deq, injection.detach())
    states = [trajectory.state(m) for m in range(last)]
    # all forcing terms at once where the device takes the stack; else each with its step's VJP
    stacked = stack_size(trajectory.z0, last) > 1
    forcing = head_gradients(head, states, cotangent) if stacked else None
    u = torch.zeros_like(trajectory.z0)
    total = torch.zeros_like(injection)
    shape = (-1, *[1] * (injection.dim() - 1))
    for m in range(last + 1):
        update, weighted = m < last, m in weights
        if m == 0:  # u_0 = 0: no VJP of f, only the forcing term
            v = forcing[0] if forcing is not None else head_gradient(head, states[0], cotangent)
        else:
            z_m = trajectory.state(m)
            recorded = evaluations.graph(m, z_m) if evaluations is not None else None
            with torch.enable_grad():
                if recorded is not None:
                    assert evaluations is not None and evaluations.injection is not None
                    z_leaf, fz = recorded
                    inj = evaluations.injection
                else:
                    z_leaf = z_m.detach().requires_grad_()
                    inj = injection.detach().requires_grad_()
                    fz = deq.step(z_leaf, inj)
                outputs, grad_outputs = [fz], [u]
                if update and forcing is None:  # the head's VJP in the same backward
                    logits = head(z_leaf)
                    outputs.append(logits)
                    grad_outputs.append(cotangent(logits))
                inputs = ([z_leaf] if update else []) + ([inj] if weighted else [])
                grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
            if weighted:
                grad_inj = grads[-1] if grads[-1] is not None else torch.zeros_like(injection)
                total = total + weights[m].to(injection.dtype).reshape(shape) * grad_inj
            if update:
                # J_f(z_m)^T u_m (+ the forcing term when it came from the same backward)
                v = grads[0] if grads[0] is not None else torch.zeros_like(u)
                if forcing is not None:
                    v = v + forcing[m]
        if update:
            u = u - beta * apply_inverse(m, v - u)
    return total


def _check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"beta (adjoint step size) must be in (0, 1], got {beta!r}")


@register_estimate("adjoint")
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
        reuse_forward: keep, during the forward solve that precedes the backward, every
            evaluation of f with its autograd graph, so that the sweep takes only VJPs instead
            of evaluating f again at each z_m (the same estimate, to rounding; a step where
            some sample stopped earlier, so that the solver evaluated f elsewhere than at its
            z_m, is evaluated again). Costs the activations of every evaluation of f (memory
            O(N)) in exchange for about a third less time. Only where this estimate's own
            forward solve runs (``loss_gradient``, ``input_gradient`` without a trajectory,
            the autograd path); otherwise f is evaluated again.
    """

    n: int | None = None
    beta: float = 0.5
    inverse: InverseEstimate = InverseEstimate.BROYDEN
    transpose: bool = True
    reuse_forward: bool = False

    def __post_init__(self) -> None:
        check_step(self.n, "Adjoint")
        _check_beta(self.beta)
        if not isinstance(self.inverse, InverseEstimate):
            raise TypeError(f"inverse must be an InverseEstimate, got {self.inverse!r}")
        for name in ("transpose", "reuse_forward"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def reuses_forward(self) -> bool:
        return self.reuse_forward

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


@register_estimate("adjoint_broyden")
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
        forcing = head_gradient(lambda s: deq.logits(s, injection), z, backward.cotangent)
        u = -apply_inverse(n, forcing)
        with torch.enable_grad():
            inj = injection.detach().requires_grad_()
            fz = deq.step(z.detach(), inj)
            (grad,) = torch.autograd.grad(fz, inj, u)
        return grad


@dataclass(frozen=True)
class AdjointFamily(SweepFamily):
    """The sweep of ``Adjoint(n, beta)``. Over a solver that keeps no inverse estimate
    (Anderson, fixed-point iteration) the adjoint steps with ``B_m = -I`` (the damped
    fixed-point adjoint) and the adjoint-Broyden baseline is left out."""

    def plan(self, solver: Solver) -> FamilyPlan:
        name = type(solver).__name__
        if solver.keeps_inverse:
            return FamilyPlan(
                self.name,
                True,
                {},
                f"{name} keeps its inverse-Jacobian estimates B_m: the adjoint steps with them "
                "(Sec. 4.1)",
            )
        return FamilyPlan(
            self.name,
            True,
            {"inverse": InverseEstimate.NEGATIVE_IDENTITY},
            f"{name} keeps no inverse-Jacobian estimate B_m, so the adjoint steps with "
            "B_m = -I (InverseEstimate.NEGATIVE_IDENTITY: the damped fixed-point adjoint "
            "u <- u + beta (J_f^T u + dL/dz - u))",
            (
                f"AdjointBroyden (the adjoint from Broyden's inverse estimate alone, App. D) has "
                f"no meaning over {name}, which keeps no inverse estimate: left out",
            ),
        )


ADJOINT_FAMILY = register_sweep_family(
    AdjointFamily(
        "adjoint",
        Adjoint,
        (step_parameter(), SweepParameter("beta", float, "0.5,1.0", check=_check_beta)),
    )
)
"""``Adjoint(n, beta)`` over every n and beta in {0.5, 1} (the paper's Fig. 4)."""
