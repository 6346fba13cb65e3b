"""The threat model every attack column runs under (L-inf or L2) and the AutoAttack budgets:
plain settings that import no torch (the command line's ``--help`` reads them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: The norms of a threat model, RobustBench's names.
NORMS = ("Linf", "L2")

#: The four attacks of the standard AutoAttack, in the order it runs them.
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass(frozen=True)
class ThreatModel:
    """L-inf or L2 threat model (RobustBench convention: inputs in [0, 1], the model returns
    logits).

    Args:
        eps: perturbation budget (default 8/255): the largest ``||x_adv - x||`` in ``norm``.
        step: PGD step size (default 2/255): the ``norm`` length of one step (L-inf: the sign
            of the gradient times ``step``; L2: the gradient scaled to L2 length ``step``).
        steps: PGD iterations (default 10).
        random_start: PGD starts uniformly inside the eps-ball (clipped to [0, 1]).
        norm: "Linf" or "L2" (RobustBench's names).
    """

    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    norm: str = "Linf"

    def __post_init__(self) -> None:
        check_norm(self.norm)
        check_budget("eps", self.eps, self.norm)
        check_budget("step", self.step, self.norm)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")


def check_norm(norm: object) -> str:
    """``norm`` if it is one of ``NORMS``; anything else raises naming the choices."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return str(norm)


def check_budget(name: str, value: float, norm: str) -> None:
    """An eps or step size in ``norm``: L-inf in (0, 1] (pixels are in [0, 1]); L2 finite and
    > 0 (an L2 ball of radius above 1 is still a small perturbation of a large image)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if norm == "Linf" and not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1] under L-inf, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


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
