"""Input entropy reduction, the test-time defense of Yang, Li, Pang, Liu (ICML 2023, "Improving
Adversarial Robustness of DEQs with Explicit Regulations Along the Neural Dynamics"; code:
minicheshire/DEQ-Regulating-Neural-Dynamics, ``input-entropy-reduction/``).

The defended forward of a DEQ on an input x (B, ...) in [0, 1]:

1. z = z_0; x' = x. For each of ``threshold // every`` rounds: ``every`` solver steps on
   ``f(z; x')`` from z, then ``steps`` signed-gradient steps on x' that lower the entropy of
   the prediction ``head(f(z; x'))`` (z held fixed): ``x' <- x' - step * sign(dH/dx')``,
   projected to the L-inf ``eps``-ball around x and to [0, 1].
2. The logits are those of the DEQ's Final readout at the last z with the GIVEN input x:
   ``head(training_gradient.forward_state(z; x))`` (their code applies ``func``, built on the
   original input, after the loop).

Their code continues one Broyden solve across the rounds and corrects its inverse estimate for
the changed input; here each round restarts the DEQ's solver from the current z (the states
continue, the solver's memory does not): identical for fixed-point iteration, an
approximation of their Broyden. The paper's defaults (CIFAR-10): rounds of 2 solver steps, 10
steps of 2/255 within 8/255.

``differentiable=True`` records autograd through everything: every solver step (as
``BackpropThroughSolver`` does), every input update, the readout. The inner direction
``sign(dH/dx')`` is piecewise constant in x, so its derivative is 0 almost everywhere: the
exact gradient of the defended logits treats each direction as a constant, and a
``create_graph`` through the inner gradient would add exactly 0 (the tests check the gradient
against finite differences). ``straight_through=True`` is BPDA (Athalye et al. 2018) over the
input updates: the forward as defended, the backward as if x' were x (dx'/dx = I; the exact
derivative is 0 on pixels that the [0, 1] clip holds, which can hide a gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deq_attacks.deq.contract import DEQModel


@dataclass(frozen=True)
class InputEntropyReduction:
    """The defense's settings (defaults: the paper's CIFAR-10 values).

    Args:
        steps: signed-gradient steps on the input per round (R; paper 10).
        step: their size (paper 2/255).
        eps: L-inf radius around the given input that the updated input stays in (8/255).
        every: solver steps per round (T_f; paper 2); rounds = solver threshold // every.
    """

    steps: int = 10
    step: float = 2 / 255
    eps: float = 8 / 255
    every: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("step", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")

    def rounds(self, threshold: int) -> int:
        """Rounds of ``every`` solver steps within ``threshold`` (at least one needed)."""
        if threshold < self.every:
            raise ValueError(
                f"the solver's threshold {threshold} is below the defense's {self.every} "
                "solver steps per round"
            )
        return threshold // self.every


def prediction_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy (B,) of softmax(logits)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def lower_entropy(
    deq: DEQModel, z: Tensor, x_now: Tensor, x: Tensor, defense: InputEntropyReduction
) -> Tensor:
    """``defense.steps`` signed steps on ``x_now`` (B, ...) lowering the entropy of
    ``head(f(z; x_now))`` with z (B, d) fixed, each projected to the ``eps``-ball around ``x``
    and [0, 1]. The directions are computed without a graph (detached inputs); the returned
    tensor is differentiable in ``x_now`` and ``x`` through the updates and projections."""
    for _ in range(defense.steps):
        with torch.enable_grad():
            probe = x_now.detach().requires_grad_()
            injection = deq.inject(probe)
            logits = deq.logits(deq.step(z.detach(), injection), injection)
            (grad,) = torch.autograd.grad(prediction_entropy(logits).sum(), probe)
        x_now = x_now - defense.step * grad.sign()
        x_now = torch.min(torch.max(x_now, x - defense.eps), x + defense.eps).clamp(0.0, 1.0)
    return x_now


def _map(deq: DEQModel, injection: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda z: deq.step(z, injection)


def entropy_defended_logits(
    deq: DEQModel,
    x: Tensor,
    defense: InputEntropyReduction,
    *,
    differentiable: bool = False,
    straight_through: bool = False,
) -> Tensor:
    """The defended logits (B, classes) of ``deq`` on ``x`` (module docstring).

    Args:
        deq: the DEQ (inputs in [0, 1]).
        x: the input batch (B, ...).
        defense: the defense's settings.
        differentiable: record autograd through the whole defended computation (x must
            require grad for an input gradient); else no graph beyond the readout.
        straight_through: in the backward, treat the updated input as the given one (BPDA).
    """
    rounds = defense.rounds(deq.solver.threshold)
    solver = dataclasses.replace(deq.solver, threshold=defense.every)
    deq.reset()
    batch = x.shape[0]
    given = deq.inject(x)
    z = deq.initial_state(given).reshape(batch, -1)
    if not differentiable:
        z = z.detach()
    x_now = x
    for _ in range(rounds):
        injection = deq.inject(x_now)
        trajectory = solver.solve(_map(deq, injection), z, differentiable=differentiable)
        z = trajectory.final
        x_next = lower_entropy(deq, z, x_now, x, defense)
        if straight_through:
            x_next = x + (x_next - x).detach()
        x_now = x_next if differentiable else x_next.detach()
    state = deq.training_gradient.forward_state(deq, z, given)
    return deq.logits(state, given)
