"""The L-inf threat model every attack column runs under and the AutoAttack budgets: plain
settings that import no torch (the command line's ``--help`` reads them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: The four attacks of the standard AutoAttack, in the order it runs them.
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


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


@dataclass(frozen=True)
class AutoAttackSettings:
    """Iterations of APGD-CE, APGD-T and FAB-T, queries of Square, and target classes of APGD-T
    and FAB-T. The defaults are the standard version's; smaller values (for CPU tests and
    demos) are recorded with every result and marked non-standard.
    """

    iterations: int = 100
    queries: int = 5000
    target_classes: int = 9

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoAttack {name} must be an int >= 1, got {value!r}")

    @property
    def standard(self) -> bool:
        return self == AutoAttackSettings()

    def describe(self) -> dict[str, object]:
        return {**asdict(self), "standard": self.standard, "attacks": list(STANDARD_ATTACKS)}
