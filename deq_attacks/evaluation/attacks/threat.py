"""The L-inf threat model every attack column runs under."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreatModel:
    """L-inf threat model (RobustBench convention: inputs in [0, 1], the model returns logits).

    Args:
        eps: perturbation budget (default 8/255).
        step: PGD step size (default 2/255).
        steps: PGD iterations (default 10).
        random_start: PGD starts uniformly inside the eps-ball (clipped to [0, 1]).
    """

    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and 0 < self.eps <= 1):
            raise ValueError(f"eps must be in (0, 1], got {self.eps!r}")
        if not (math.isfinite(self.step) and 0 < self.step <= 1):
            raise ValueError(f"step must be in (0, 1], got {self.step!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
