"""Gradient estimates of dL/dx for DEQs (Sec. 2.1, 4, 5.1), each a typed, validated object.

Every estimate registers itself by name (``registry``: specs, text such as
``"unrolled:n=1,k=5"``); the per-step families declare their sweep (``sweep_family``).
A new estimate is one module (the class, ``@register_estimate``, and for a per-step family
its ``register_sweep_family``) plus one import here.
"""

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
from deq_attacks.gradients.ready_made import ready_made
from deq_attacks.gradients.registry import (
    estimate_from_spec,
    estimate_names,
    estimate_spec,
    make_estimate,
    parse_estimate,
    register_estimate,
)
from deq_attacks.gradients.sweep_family import (
    FamilyPlan,
    SweepFamily,
    SweepParameter,
    register_sweep_family,
    scoped_registry,
    step_parameter,
    sweep_families,
    sweep_family,
)
from deq_attacks.gradients.through_solver import BackpropThroughSolver, traced_logits
from deq_attacks.gradients.unrolled import Unrolled

__all__ = [
    "Adjoint",
    "AdjointBroyden",
    "BackpropThroughSolver",
    "BackwardPass",
    "Cotangent",
    "FamilyPlan",
    "GradientEnsemble",
    "Exact",
    "GradientEstimate",
    "InverseEstimate",
    "PerStepEstimate",
    "Phantom",
    "SweepFamily",
    "SweepParameter",
    "Unrolled",
    "constant_cotangent",
    "estimate_from_spec",
    "estimate_names",
    "estimate_spec",
    "input_gradient",
    "loss_cotangent",
    "make_estimate",
    "parse_estimate",
    "ready_made",
    "register_estimate",
    "register_sweep_family",
    "scoped_registry",
    "step_parameter",
    "sweep_families",
    "sweep_family",
    "traced_logits",
]
