"""deq-attacks: honest white-box robustness evaluation and adversarial training of DEQs.

Data flow: x -> injection -> solver over f(z; x) -> Trajectory -> readout -> head -> logits,
with gradients for attacks chosen among the estimates of Yang, Pang & Liu (NeurIPS 2022).
The names below are imported on first use (``deq_attacks.lazy``): ``import deq_attacks`` alone
imports no torch.
"""

from typing import TYPE_CHECKING

from deq_attacks.lazy import lazy_exports

if TYPE_CHECKING:
    from deq_attacks.deq import (
        DEQ,
        ConvergenceLog,
        DEQModel,
        Early,
        Ensemble,
        Final,
        ImplicitGradient,
        JacobianRegularization,
        PhantomGradient,
        Readout,
        SolverDivergedError,
        spectral_radius,
    )
    from deq_attacks.gradients import (
        Adjoint,
        AdjointBroyden,
        BackpropThroughSolver,
        Exact,
        GradientEnsemble,
        GradientEstimate,
        InverseEstimate,
        Phantom,
        Unrolled,
        parse_estimate,
        ready_made,
    )
    from deq_attacks.interfaces import DEQEstimator, DEQFoolboxModel, WhiteBoxModule
    from deq_attacks.solvers import Anderson, Broyden, FixedPointIteration, StopMode, Trajectory

__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "deq_attacks.deq": (
            "DEQ",
            "ConvergenceLog",
            "DEQModel",
            "Early",
            "Ensemble",
            "Final",
            "ImplicitGradient",
            "JacobianRegularization",
            "PhantomGradient",
            "Readout",
            "SolverDivergedError",
            "spectral_radius",
        ),
        "deq_attacks.gradients": (
            "Adjoint",
            "AdjointBroyden",
            "BackpropThroughSolver",
            "Exact",
            "GradientEnsemble",
            "GradientEstimate",
            "InverseEstimate",
            "Phantom",
            "Unrolled",
            "parse_estimate",
            "ready_made",
        ),
        "deq_attacks.interfaces": ("DEQEstimator", "DEQFoolboxModel", "WhiteBoxModule"),
        "deq_attacks.solvers": (
            "Anderson",
            "Broyden",
            "FixedPointIteration",
            "StopMode",
            "Trajectory",
        ),
    },
)

__all__ = [
    "DEQ",
    "DEQModel",
    "Adjoint",
    "AdjointBroyden",
    "Anderson",
    "BackpropThroughSolver",
    "Broyden",
    "ConvergenceLog",
    "DEQEstimator",
    "DEQFoolboxModel",
    "Early",
    "Ensemble",
    "Exact",
    "Final",
    "FixedPointIteration",
    "GradientEnsemble",
    "GradientEstimate",
    "ImplicitGradient",
    "InverseEstimate",
    "JacobianRegularization",
    "Phantom",
    "PhantomGradient",
    "Readout",
    "SolverDivergedError",
    "StopMode",
    "Trajectory",
    "Unrolled",
    "WhiteBoxModule",
    "parse_estimate",
    "ready_made",
    "spectral_radius",
]
