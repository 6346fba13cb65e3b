"""The DEQ module, its readouts (defenses), training gradients and Jacobian tools."""

from deq_attacks.deq.backward import ImplicitGradient, PhantomGradient, TrainingGradient
from deq_attacks.deq.contract import DEQModel, ResetHook
from deq_attacks.deq.convergence import RESIDUAL_LIMIT, ConvergenceLog, NotConvergedWarning
from deq_attacks.deq.dropout import VariationalDropout, reset_variational_dropout
from deq_attacks.deq.model import DEQ, SolverDivergedError
from deq_attacks.deq.readout import Early, Ensemble, Final, Readout
from deq_attacks.deq.regularization import (
    JacobianRegularization,
    hutchinson_frobenius,
    spectral_radius,
)

__all__ = [
    "DEQ",
    "RESIDUAL_LIMIT",
    "DEQModel",
    "ConvergenceLog",
    "NotConvergedWarning",
    "ResetHook",
    "Early",
    "Ensemble",
    "Final",
    "ImplicitGradient",
    "JacobianRegularization",
    "PhantomGradient",
    "Readout",
    "SolverDivergedError",
    "TrainingGradient",
    "VariationalDropout",
    "reset_variational_dropout",
    "hutchinson_frobenius",
    "spectral_radius",
]
