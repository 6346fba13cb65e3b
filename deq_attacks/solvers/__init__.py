"""Fixed-point solvers that record what they hide: iterates, residuals, inverse estimates."""

from deq_attacks.solvers.anderson import Anderson
from deq_attacks.solvers.base import FixedPointMap, Solver, StopMode, relative_residual
from deq_attacks.solvers.broyden import Broyden
from deq_attacks.solvers.fixed_point import FixedPointIteration
from deq_attacks.solvers.trajectory import BroydenInverse, Trajectory

__all__ = [
    "Anderson",
    "Broyden",
    "BroydenInverse",
    "FixedPointIteration",
    "FixedPointMap",
    "Solver",
    "StopMode",
    "Trajectory",
    "relative_residual",
]
