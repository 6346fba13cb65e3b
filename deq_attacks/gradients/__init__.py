"""Gradient estimates of dL/dx for DEQs (Sec. 2.1, 4, 5.1), each a typed, validated object."""

from deq_attacks.gradients.adjoint import Adjoint, AdjointBroyden, InverseEstimate
from deq_attacks.gradients.base import (
    BackwardPass,
    Cotangent,
    GradientEstimate,
    PerStepEstimate,
    constant_cotangent,
    input_gradient,
    loss_cotangent,
)
from deq_attacks.gradients.ensemble import GradientEnsemble
from deq_attacks.gradients.exact import Exact
from deq_attacks.gradients.phantom import Phantom
from deq_attacks.gradients.through_solver import BackpropThroughSolver, traced_logits
from deq_attacks.gradients.unrolled import Unrolled

__all__ = [
    "Adjoint",
    "AdjointBroyden",
    "BackpropThroughSolver",
    "BackwardPass",
    "Cotangent",
    "GradientEnsemble",
    "Exact",
    "GradientEstimate",
    "InverseEstimate",
    "PerStepEstimate",
    "Phantom",
    "Unrolled",
    "constant_cotangent",
    "input_gradient",
    "loss_cotangent",
    "traced_logits",
]
