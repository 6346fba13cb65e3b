"""Attack specifications: one column of an evaluation table, as data.

A column is an algorithm (``AttackKind``), the gradient estimate it receives and its budget.
``PGD`` is the fixed-step, loss-aware PGD whose adversarial examples do not depend on the
defense (one run scores every defense); every other kind looks at the defended output and runs
once per defense: the standard AutoAttack and Square through ``pyautoattack``, and ART's
APGD-CE/DLR and ART's own ``AutoAttack`` list (a different attack set, kept under its own
name ``art-autoattack``).
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import numpy as np
import torch
from art.attacks.evasion import AutoAttack as ArtAutoAttack
from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
from pyautoattack.square import SquareAttack as AASquare
from torch import Tensor, nn

from deq_attacks.deq.convergence import NotConvergedWarning
from deq_attacks.evaluation.autoattack import AutoAttackSettings, run_standard_autoattack
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
    """The attack algorithms an evaluation can run."""

    PGD = "pgd"  # fixed-step loss-aware PGD (ours); shared across defenses
    AUTOATTACK = "autoattack"  # the standard AutoAttack (pyautoattack)
    SQUARE = "square"  # Square, L-inf, margin loss (pyautoattack)
    APGD_CE = "apgd-ce"  # ART
    APGD_DLR = "apgd-dlr"  # ART
    ART_AUTOATTACK = "art-autoattack"  # ART's AutoAttack list (APGD-CE/DLR, DeepFool, Square)

    @property
    def shared(self) -> bool:
        """Whether one run serves every defense (it never looks at the defended output)."""
        return self is AttackKind.PGD

    @property
    def needs_estimate(self) -> bool:
        return self is not AttackKind.SQUARE


ArtAttack: TypeAlias = AutoProjectedGradientDescent | SquareAttack | ArtAutoAttack


@dataclass(frozen=True)
class AttackSpec:
    """One attack column: an algorithm, the gradient estimate it receives, and a label.

    Args:
        label: column name in tables and the key in result files.
        kind: the algorithm.
        estimate: the gradient the attack receives (None only for Square).
        steps: iterations (PGD, ART's APGD and ART's AutoAttack) or queries (Square); None
            takes the threat model's steps for gradient attacks and 5,000 queries for Square.
            For the standard AutoAttack use ``autoattack`` instead.
        autoattack: the standard AutoAttack's settings (AUTOATTACK only; default standard).
    """

    label: str
    kind: AttackKind
    estimate: GradientEstimate | None = None
    steps: int | None = None
    autoattack: AutoAttackSettings = field(default_factory=AutoAttackSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AttackKind):
            raise TypeError(f"kind must be an AttackKind, got {self.kind!r}")
        if not self.label:
            raise ValueError("an attack needs a non-empty label")
        if self.kind.needs_estimate and not isinstance(self.estimate, GradientEstimate):
            raise ValueError(f"{self.kind.value} needs a gradient estimate, got {self.estimate!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.kind is AttackKind.AUTOATTACK and self.steps is not None:
            raise ValueError("the standard AutoAttack takes its budget from autoattack=, not steps")

    def budget(self, threat: ThreatModel) -> int:
        """Iterations or queries this column runs (ART's AutoAttack: its APGD iterations)."""
        if self.steps is not None:
            return self.steps
        if self.kind is AttackKind.ART_AUTOATTACK:
            return 100
        return 5000 if self.kind is AttackKind.SQUARE else threat.steps

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        """The settings of this column, for result files."""
        info: dict[str, Any] = {
            "kind": self.kind.value,
            "estimate": repr(self.estimate) if self.estimate is not None else None,
            "eps": threat.eps,
        }
        if self.kind is AttackKind.AUTOATTACK:
            info["autoattack"] = self.autoattack.describe()
        else:
            info["budget"] = self.budget(threat)
        if self.kind is AttackKind.PGD:
            info.update(step=threat.step, random_start=threat.random_start, restarts=1)
        return info

    def run_defended(
        self,
        estimator: DEQEstimator,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        *,
        seed: int,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Adversarial examples against the estimator's current defense, for one block, and
        per-sample extras (AutoAttack: survival after each of its attacks, who broke it)."""
        if self.kind.shared:
            raise ValueError(f"{self.label}: PGD is a shared run (deq_attacks.evaluation.pgd)")
        with estimator.using(estimate=self.estimate):
            if self.kind in (AttackKind.AUTOATTACK, AttackKind.SQUARE):
                return self._run_pyautoattack(estimator, x, y, threat, seed)
            np.random.seed(seed)
            attack = self._build_art(estimator, threat, len(x))
            labels = np.eye(estimator.nb_classes, dtype=np.float32)[y]
            return attack.generate(x, labels).astype(np.float32), {}

    def _run_pyautoattack(
        self, estimator: DEQEstimator, x: np.ndarray, y: np.ndarray, threat: ThreatModel, seed: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        model = DefendedModel(estimator)
        xt = torch.as_tensor(x, device=estimator.device)
        yt = torch.as_tensor(y, device=estimator.device)
        if self.kind is AttackKind.SQUARE:
            square = AASquare(
                model, norm="Linf", n_queries=self.budget(threat), eps=threat.eps, p_init=0.8,
                n_restarts=1, seed=seed, verbose=False, device=xt.device, resc_schedule=True,
            )  # fmt: skip
            return square.perturb(xt, yt).detach().cpu().numpy(), {}
        outcome = run_standard_autoattack(
            model, xt, yt, threat.eps, self.autoattack, estimator.nb_classes, seed=seed
        )
        extras = {f"after/{k}": v for k, v in outcome.after.items()}
        extras["broken_by"] = outcome.broken_by
        return outcome.x_adv, extras

    def _build_art(self, estimator: DEQEstimator, threat: ThreatModel, batch: int) -> ArtAttack:
        """The ART attack object for this column."""
        steps = self.budget(threat)
        if self.kind in (AttackKind.APGD_CE, AttackKind.APGD_DLR):
            loss = "cross_entropy" if self.kind is AttackKind.APGD_CE else "difference_logits_ratio"
            return AutoProjectedGradientDescent(
                estimator, norm=np.inf, eps=threat.eps, eps_step=threat.step, max_iter=steps,
                batch_size=batch, loss_type=loss, verbose=False,
            )  # fmt: skip
        if self.steps is None:  # ART's own default list and budgets
            return ArtAutoAttack(estimator, norm=np.inf, eps=threat.eps, eps_step=threat.step,
                                 batch_size=batch)  # fmt: skip
        # ART's default list with the spec's budget: APGD and DeepFool iterations = steps,
        # Square queries = 50 * steps (ART's 100 : 5,000)
        apgd = [
            AutoProjectedGradientDescent(
                estimator,
                norm=np.inf,
                eps=threat.eps,
                eps_step=threat.step,
                max_iter=steps,
                nb_random_init=5,
                batch_size=batch,
                loss_type=loss,
                verbose=False,
            )  # fmt: skip
            for loss in ("cross_entropy", "difference_logits_ratio")
        ]
        from art.attacks.evasion import DeepFool

        deepfool = DeepFool(estimator, max_iter=steps, epsilon=1e-3, nb_grads=10, batch_size=batch)
        square = SquareAttack(
            estimator, norm=np.inf, max_iter=50 * steps, eps=threat.eps, p_init=0.8, nb_restarts=5
        )
        return ArtAutoAttack(
            estimator,
            norm=np.inf,
            eps=threat.eps,
            eps_step=threat.step,
            attacks=[*apgd, deepfool, square],
            batch_size=batch,
        )


class DefendedModel(nn.Module):
    """``estimator.model`` behind the estimator's ART preprocessing: inputs in [0, 1] to the
    defended logits, differentiable through the selected estimate. Attacks that differentiate
    a torch module (AutoAttack, Square) receive this."""

    def __init__(self, estimator: DEQEstimator) -> None:
        super().__init__()
        self.estimator = estimator
        self.white_box = estimator.model

    def forward(self, x: Tensor) -> Tensor:
        processed, _ = self.estimator._apply_preprocessing(x, y=None, fit=False, no_grad=False)
        # convergence is reported once, by the protocol's diagnostics, not at every query
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotConvergedWarning)
            return cast(Tensor, self.white_box(processed))
