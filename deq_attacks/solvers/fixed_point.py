"""Plain (optionally damped) fixed-point iteration."""

from __future__ import annotations

from dataclasses import dataclass

from deq_attacks.solvers.base import Solver, _Recorder
from deq_attacks.solvers.registry import register_solver
from deq_attacks.solvers.trajectory import Trajectory


@register_solver("fixed_point")
@dataclass(frozen=True, repr=False)  # Solver's short repr
class FixedPointIteration(Solver):
    """``z_{n+1} = (1 - damping) z_n + damping f(z_n)``.

    Args:
        damping: in (0, 1]; 1 is the plain iteration ``z_{n+1} = f(z_n)``.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")

    def _solve(self, rec: _Recorder) -> Trajectory:
        for n in range(1, self.threshold + 1):
            # damping 1: z_{n+1} is f(z_n) itself (the recorder never writes into it)
            z_new = rec.fz
            if self.damping != 1:
                z_new = (1 - self.damping) * rec.z + self.damping * rec.fz
            rec.record(n, z_new, rec.evaluate(z_new))
            if not rec.any_active:
                break
        return rec.finish()
