"""What a gradient estimate is, and the two cotangent sources that drive it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deq_attacks.numerics import Cotangent, ForwardRecord, damped_unroll
from deq_attacks.solvers import Solver, Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.contract import DEQModel
    from deq_attacks.deq.readout import Readout


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


@dataclass(frozen=True)
class BackwardPass:
    """Everything one estimate needs for one backward, passed as one argument.

    Attributes:
        deq: the model.
        trajectory: the record of the forward solve (flat states (B, d)).
        injection: the detached injection (B, ...) of that forward.
        cotangent: dL/dlogits at any logits (B, classes) the estimate computes.
        readout: the defense whose logits the forward returned (estimates that differentiate
            the defended computation itself need it; the paper's estimates ignore it).
        evaluations: the forward solve's evaluations of f with their graphs, where the
            estimate asked for them (``reuses_forward``) and the forward was solved here;
            else None.
    """

    deq: DEQModel
    trajectory: Trajectory
    injection: Tensor
    cotangent: Cotangent
    readout: Readout
    evaluations: ForwardRecord | None = None


class GradientEstimate(ABC):
    """An estimate of dL/dx for a DEQ: computes dL/d(injection) from one forward pass.

    The gradient w.r.t. the input follows by one vector-Jacobian product through the
    injection (see ``input_gradient``). A new estimate is a frozen dataclass that subclasses
    this, implements ``injection_gradient`` (and ``keep_steps``/``check`` where it needs
    iterates or a solver feature), registers its name with ``@register_estimate`` in its own
    module (a per-step one also its ``register_sweep_family``), and is exported from
    ``deq_attacks.gradients``.
    """

    #: True where the estimate differentiates the defended computation itself, so its gradient
    #: (and a fixed-step attack with it) differs per defense; the paper's estimates do not.
    depends_on_defense: bool = False

    def check(self, solver: Solver) -> None:
        """Raise if this estimate cannot be computed over ``solver``'s trajectories."""
        return None

    def keep_steps(self, threshold: int) -> bool | frozenset[int]:
        """Which iterates the forward solve must keep (True: all)."""
        return frozenset()

    @property
    def reuses_forward(self) -> bool:
        """Whether the forward solve should record its evaluations of f with their graphs
        (``BackwardPass.evaluations``) for this estimate's backward to reuse."""
        return False

    @abstractmethod
    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        """The estimate of dL/d(injection), shaped like ``backward.injection``."""


StepWeights = dict[int, Tensor]
"""Step n -> per-sample weight (B,) of that step's term in a weighted sum of estimates."""


class PerStepEstimate(GradientEstimate):
    """An estimate defined at an intermediate step ``n`` (its field; None: the last step), which
    ``GradientEnsemble`` averages over n."""

    n: int | None

    @abstractmethod
    def weighted(self, backward: BackwardPass, weights: StepWeights) -> Tensor:
        """``sum_n weights[n] * (the estimate at step n)``, shaped like the injection."""


def weighted_sum(
    backward: BackwardPass, weights: StepWeights, term: Callable[[int], Tensor]
) -> Tensor:
    """``sum_n weights[n] * term(n)`` with per-sample weights broadcast over the injection."""
    injection = backward.injection
    total = torch.zeros_like(injection)
    shape = (-1, *[1] * (injection.dim() - 1))
    for n, weight in weights.items():
        total = total + weight.to(injection.dtype).reshape(shape) * term(n)
    return total


def input_gradient(
    deq: DEQModel,
    estimate: GradientEstimate,
    x: Tensor,
    cotangent: Cotangent,
    trajectory: Trajectory | None = None,
    readout: Readout | None = None,
    *,
    evaluations: ForwardRecord | None = None,
) -> Tensor:
    """dL/dx (shaped like x) by ``estimate`` for the defense ``readout`` (default the DEQ's
    own), solving the forward pass unless given (``evaluations``: that given solve's record of
    f, if it kept one). A solve run here keeps its record where the estimate reuses it."""
    estimate.check(deq.solver)
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_()
        injection = deq.inject(x_leaf)
        if trajectory is None:
            keep = estimate.keep_steps(deq.solver.threshold)
            if estimate.reuses_forward:
                evaluations = ForwardRecord()
                trajectory = deq.solve(injection.detach(), keep=keep, record=evaluations)
            else:
                trajectory = deq.solve(injection.detach(), keep=keep)
        backward = BackwardPass(
            deq, trajectory, injection.detach(), cotangent, readout or deq.readout, evaluations
        )
        grad_injection = estimate.injection_gradient(backward)
        (grad_x,) = torch.autograd.grad(injection, x_leaf, grad_injection)
    return grad_x


def unrolled_injection_gradient(
    backward: BackwardPass, z_start: Tensor, k: int, lam: float
) -> Tensor:
    """dL/d(injection) through ``k`` damped steps from the detached ``z_start`` (Eq. 13-16)."""
    deq, injection, cotangent = backward.deq, backward.injection, backward.cotangent
    with torch.enable_grad():
        inj = injection.detach().requires_grad_()
        z = damped_unroll(lambda s: deq.step(s, inj), z_start.detach(), k, lam)
        logits = deq.logits(z, inj)
        (grad,) = torch.autograd.grad(logits, inj, cotangent(logits))
    return grad
