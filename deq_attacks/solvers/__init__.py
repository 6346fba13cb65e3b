"""Fixed-point solvers that record what they hide: iterates, residuals, inverse estimates.

Each solver registers itself by name (``deq_attacks.solvers.registry``): ``parse_solver``
builds one from text such as ``"anderson:threshold=8,memory=5"``.
"""

from deq_attacks.solvers.anderson import Anderson
from deq_attacks.solvers.base import FixedPointMap, Solver, StopMode, relative_residual
from deq_attacks.solvers.broyden import Broyden
from deq_attacks.solvers.fixed_point import FixedPointIteration
from deq_attacks.solvers.registry import (
    make_solver,
    parse_solver,
    register_solver,
    scoped_solvers,
    solver_class,
    solver_from_spec,
    solver_name,
    solver_names,
    solver_spec,
)
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
    "make_solver",
    "parse_solver",
    "register_solver",
    "relative_residual",
    "scoped_solvers",
    "solver_class",
    "solver_from_spec",
    "solver_name",
    "solver_names",
    "solver_spec",
]
