"""Backpropagation through the solver: the exact gradient of the defended logits as computed."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deq_attacks.gradients.base import BackwardPass, GradientEstimate
from deq_attacks.gradients.registry import register_estimate
from deq_attacks.solvers import Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.contract import DEQModel
    from deq_attacks.deq.readout import Readout


def traced_logits(
    deq: DEQModel, injection: Tensor, readout: Readout, *, checkpoint: bool = False
) -> tuple[Tensor, Trajectory]:
    """The defended logits (B, classes) of ``readout``, with autograd through the solve.

    Re-runs the DEQ's forward computation from ``injection`` (B, ...) exactly as ``deq(x)``
    runs it - ``z_0 = deq.initial_state(injection)``, the DEQ's solver and settings with its
    per-sample stopping and lowest-residual choice, the readout (``Final``: the training
    gradient's forward map of ``z*``; ``Early(n)``: ``z_n``; ``Ensemble``: the mean of each
    sample's own iterates), then the head - but records autograd through every step. The
    solve's discrete decisions are constants. Unlike ``deq.solve`` it neither resets dropout
    masks nor records ``deq.last_trajectory``.

    Returns:
        the logits, differentiable in ``injection`` and the parameters, and the trajectory of
        the differentiable solve (its ``final``/``states``/``state_sum`` carry the graph).
    """
    batch = injection.shape[0]
    z0 = deq.initial_state(injection).reshape(batch, -1)
    trajectory = deq.solver.solve(
        lambda z: deq.step(z, injection),
        z0,
        keep=readout.keep_steps(),
        differentiable=True,
        checkpoint=checkpoint,
    )
    state = readout.traced_state(deq, trajectory, injection)
    return deq.logits(state, injection), trajectory


@register_estimate("bptt")
@dataclass(frozen=True)
class BackpropThroughSolver(GradientEstimate):
    """Backpropagation through the solver ("BPTT"): autograd through the forward computation of
    the defended logits exactly as it ran - every solver step (Broyden's updates of ``B_n``,
    Anderson's least-squares mixing), per-sample stopping, the lowest-residual choice, the
    readout of the defense and the head.

    It is the exact gradient of what the defended model computes, converged or not; at a
    converged fixed point it agrees with ``Exact``. Not an estimate of the paper (its App. F.1
    allows white-box attackers to trace every solver step); it is the yardstick of the others.

    Cost: the forward solve is run again with autograd (the no-grad forward's trajectory is
    only compared with it), then one backward through all its steps. Memory: O(N) in the solver
    steps N - every evaluation of f keeps its activations - unless ``checkpoint``.

    Args:
        checkpoint: recompute each evaluation of f in the backward (``torch.utils.checkpoint``)
            instead of keeping its activations: the memory per step falls to the solver's own
            few states (B, d), for one more evaluation of f per step. For DEQ-Large/XL on a GPU.
    """

    checkpoint: bool = False
    depends_on_defense = True

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, bool):
            raise TypeError(f"checkpoint must be a bool, got {self.checkpoint!r}")

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        with torch.enable_grad():
            injection = backward.injection.detach().requires_grad_()
            logits, trajectory = traced_logits(
                backward.deq, injection, backward.readout, checkpoint=self.checkpoint
            )
            _check_same_decisions(backward.trajectory, trajectory)
            (grad,) = torch.autograd.grad(logits, injection, backward.cotangent(logits))
        return grad


def _check_same_decisions(forward: Trajectory, traced: Trajectory) -> None:
    """Warn if the recomputed solve stopped samples at other steps than the forward did (a
    rounding-level difference met a stopping threshold): their gradient is then that of the
    recomputed solve."""
    differ = forward.steps.to(traced.steps.device) != traced.steps
    if differ.any():
        warnings.warn(
            f"BackpropThroughSolver: the recomputed solve stopped {int(differ.sum())} sample(s) "
            "at another step than the forward pass did; their gradient is that of the "
            "recomputed solve",
            stacklevel=3,
        )
