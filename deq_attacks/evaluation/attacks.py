"""Attack specifications: one column of an evaluation table, run through ART."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from art.attacks.evasion import (
    AutoAttack,
    AutoProjectedGradientDescent,
    ProjectedGradientDescent,
    SquareAttack,
)

from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces import DEQEstimator


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


class AttackKind(enum.Enum):
    """The attack algorithms an evaluation can run (all from ART)."""

    PGD = "pgd"
    APGD_CE = "apgd-ce"
    APGD_DLR = "apgd-dlr"
    SQUARE = "square"
    AUTOATTACK = "autoattack"


_QUERY_BASED = {AttackKind.SQUARE}

ArtAttack: TypeAlias = (
    ProjectedGradientDescent | AutoProjectedGradientDescent | SquareAttack | AutoAttack
)


@dataclass(frozen=True)
class AttackSpec:
    """One attack column: an algorithm, the gradient estimate it receives, and a label.

    Args:
        label: column name in tables and the key in result files.
        kind: the algorithm.
        estimate: the gradient the attack receives (None only for query-based attacks).
        steps: iterations (PGD/APGD) or queries (Square); None takes the threat model's
            steps for gradient attacks and 1000 queries for Square.
    """

    label: str
    kind: AttackKind
    estimate: GradientEstimate | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AttackKind):
            raise TypeError(f"kind must be an AttackKind, got {self.kind!r}")
        if not self.label:
            raise ValueError("an attack needs a non-empty label")
        if self.kind not in _QUERY_BASED and not isinstance(self.estimate, GradientEstimate):
            raise ValueError(f"{self.kind.value} needs a gradient estimate, got {self.estimate!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def generate(
        self,
        estimator: DEQEstimator,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        batch_size: int,
    ) -> np.ndarray:
        """Adversarial examples for ``x`` against the estimator's current defense."""
        with estimator.using(estimate=self.estimate):
            attack = self._build(estimator, threat, batch_size)
            labels = np.eye(estimator.nb_classes, dtype=np.float32)[y]
            return attack.generate(x, labels).astype(np.float32)

    def _build(self, estimator: DEQEstimator, threat: ThreatModel, batch_size: int) -> ArtAttack:
        """The ART attack object for this column."""
        steps = self.steps or (1000 if self.kind is AttackKind.SQUARE else threat.steps)
        attack: ArtAttack
        if self.kind is AttackKind.PGD:
            attack = ProjectedGradientDescent(
                estimator,
                norm=np.inf,
                eps=threat.eps,
                eps_step=threat.step,
                max_iter=steps,
                num_random_init=1 if threat.random_start else 0,
                batch_size=batch_size,
                verbose=False,
            )
        elif self.kind in (AttackKind.APGD_CE, AttackKind.APGD_DLR):
            loss = "cross_entropy" if self.kind is AttackKind.APGD_CE else "difference_logits_ratio"
            attack = AutoProjectedGradientDescent(
                estimator,
                norm=np.inf,
                eps=threat.eps,
                eps_step=threat.step,
                max_iter=steps,
                batch_size=batch_size,
                loss_type=loss,
                verbose=False,
            )
        elif self.kind is AttackKind.SQUARE:
            attack = SquareAttack(
                estimator,
                norm=np.inf,
                eps=threat.eps,
                max_iter=steps,
                batch_size=batch_size,
                verbose=False,
            )
        else:
            attack = AutoAttack(
                estimator, norm=np.inf, eps=threat.eps, eps_step=threat.step, batch_size=batch_size
            )
        return attack
