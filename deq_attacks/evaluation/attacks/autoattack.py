"""The standard AutoAttack (Croce & Hein 2020) through ``pyautoattack`` 0.2.0, with the
per-sample result of each of its four attacks and per-sample random draws.

``pyautoattack`` carries the original APGD, FAB and Square code (equal to fra31/auto-attack at
a392200 apart from whitespace and imports). We build its ``AutoAttack(version="standard")``,
which sets the original settings (APGD-CE 100 iterations, 1 restart; APGD-T 100 iterations,
9 target classes; FAB-T 100 iterations, 9 target classes; Square 5,000 queries, p_init 0.8),
put in its APGD, APGD-T and Square the subclasses of ``per_sample`` (the same algorithms, each
sample's draws from its own seeds), and run its four attack objects in its order on the samples
still robust, as its ``run_standard_evaluation`` does, recording after each attack which
samples survive. The attacks differentiate the torch module they are given: for a column, the
column's ``DefendedModel``, whose backward is the selected estimate and whose output is the
defended logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from deq_attacks.adversarial.defended import DefendedModel, NonFiniteAsWrong
from deq_attacks.adversarial.seeds import SampleSeeds
from deq_attacks.evaluation.attacks.base import Attack, AttackOutput, register_attack
from deq_attacks.evaluation.attacks.per_sample import (
    PerSampleAPGD,
    PerSampleAPGDTargeted,
    PerSampleSquare,
)
from deq_attacks.evaluation.scoring import correct
from deq_attacks.evaluation.threat import AutoAttackSettings, ThreatModel


@dataclass
class AutoAttackOutcome:
    """Per-sample results of one AutoAttack run on a batch.

    Attributes:
        x_adv: (B, ...) the adversarial example of each broken sample (else the clean input).
        survived: bool (B,) correctly classified after all four attacks (AutoAttack's robust).
        after: attack name -> bool (B,) still robust after that attack and the ones before it.
        broken_by: (B,) name of the attack that first broke the sample; "clean" if it was
            misclassified to begin with, "" if it survived.
    """

    x_adv: np.ndarray
    survived: np.ndarray
    after: dict[str, np.ndarray]
    broken_by: np.ndarray


def build_standard(
    model: nn.Module | Callable[[Tensor], Tensor],
    eps: float,
    settings: AutoAttackSettings,
    num_classes: int,
    seed: int,
    device: torch.device | str,
    eot_draws: int = 1,
    fab_model: nn.Module | Callable[[Tensor], Tensor] | None = None,
    norm: str = "Linf",
) -> AutoAttack:
    """``AutoAttack(norm=norm, version="standard")`` on ``model``, with ``settings`` applied and
    the per-sample APGD, APGD-T and Square ("Linf" or "L2": the same four attacks).
    ``eot_draws`` is APGD's and APGD-T's ``eot_iter`` (their gradient averaged over that many
    draws per step, as AutoAttack's "rand" version does); ``fab_model`` is the model FAB-T
    differentiates (default ``model``)."""
    if num_classes < 4:
        raise ValueError(f"the standard AutoAttack needs >= 4 classes (DLR-T), got {num_classes}")
    attack = AutoAttack(model, norm=norm, eps=eps, version="standard", device=device, seed=seed)
    attack.verbose = False
    targets = min(settings.target_classes, num_classes - 1)
    # APGD derives its step-size checkpoints from n_iter in its constructor: build anew
    attack.apgd = PerSampleAPGD(
        attack.model, n_restarts=1, n_iter=settings.iterations, eps=eps, norm=norm,
        eot_iter=eot_draws, rho=0.75, seed=seed, device=device, logger=attack.logger,
    )  # fmt: skip
    attack.apgd_targeted = PerSampleAPGDTargeted(
        attack.model, n_restarts=1, n_iter=settings.iterations, eps=eps, norm=norm,
        eot_iter=eot_draws, rho=0.75, seed=seed, device=device, logger=attack.logger,
        n_target_classes=targets,
    )  # fmt: skip
    if fab_model is not None:
        attack.fab.predict = fab_model
    attack.fab.n_iter = settings.iterations
    attack.fab.n_target_classes = targets
    attack.square = PerSampleSquare(
        attack.model, p_init=0.8, n_queries=settings.queries, eps=eps, norm=norm,
        n_restarts=1, seed=seed, verbose=False, device=device, resc_schedule=False,
    )  # fmt: skip
    return attack


def _run_one(attack: AutoAttack, name: str, x: Tensor, y: Tensor, seeds: SampleSeeds) -> Tensor:
    """One of the four attacks on (x, y), set up as ``run_standard_evaluation`` sets it."""
    if name == "apgd-ce":
        attack.apgd.loss = "ce"
        return attack.apgd.run(x, y, seeds)
    if name == "apgd-t":
        return attack.apgd_targeted.run(x, y, seeds)
    if name == "fab-t":
        attack.fab.targeted = True
        attack.fab.n_restarts = 1
        attack.fab.seed = seeds.shared_seed("fab-t")
        return attack.fab.perturb(x, y)
    if name == "square":
        return attack.square.run(x, y, seeds)
    raise ValueError(f"unknown AutoAttack attack {name!r}")


def run_standard_autoattack(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    settings: AutoAttackSettings,
    num_classes: int,
    seeds: SampleSeeds | int = 0,
    eot_draws: int = 1,
    fab_model: nn.Module | Callable[[Tensor], Tensor] | None = None,
    norm: str = "Linf",
) -> AutoAttackOutcome:
    """The standard AutoAttack on one batch, recording each attack's per-sample result.

    Args:
        model: maps inputs (B, ...) in [0, 1] to logits; differentiated by APGD and FAB.
        x, y: the batch and its labels (on the model's device).
        eps: the budget in ``norm``.
        settings: iterations, queries and target classes (default: the standard ones).
        num_classes: number of classes of the model.
        seeds: the per-sample seeds of the batch, or an int: sample i of this batch then
            draws from (seed, i).
        eot_draws, fab_model: expectation over transformation (``build_standard``).
        norm: "Linf" or "L2".
    """
    if not isinstance(seeds, SampleSeeds):
        seeds = SampleSeeds.first(int(seeds), "autoattack", len(x))
    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} seeds for {len(x)} samples")
    attack = build_standard(
        model, eps, settings, num_classes, seeds.shared_seed("aa"), x.device, eot_draws,
        fab_model, norm,
    )  # fmt: skip
    with torch.no_grad():
        robust = correct(model(x), y)
    broken_by = np.where(robust.cpu().numpy(), "", "clean").astype(object)
    x_adv = x.clone()
    after: dict[str, np.ndarray] = {}
    for name in attack.attacks_to_run:
        index = torch.nonzero(robust).flatten()
        if index.numel():
            adv = _run_one(attack, name, x[index].clone(), y[index].clone(), seeds.subset(index))
            with torch.no_grad():
                fooled = ~correct(model(adv), y[index])
            hit = index[fooled]
            robust[hit] = False
            x_adv[hit] = adv[fooled].detach()
            broken_by[hit.cpu().numpy()] = name
        after[name] = robust.cpu().numpy().copy()
    return AutoAttackOutcome(
        x_adv=x_adv.detach().cpu().numpy(),
        survived=robust.cpu().numpy(),
        after=after,
        broken_by=broken_by.astype(str),
    )


@register_attack("autoattack")
@dataclass(frozen=True)
class StandardAutoAttack(Attack):
    """The standard AutoAttack with the column's estimate, against the view's defense.

    Extras per sample: ``after/<attack>`` (survival after each of its four attacks) and
    ``broken_by`` (the attack that first broke it). With ``eot_draws`` > 1, APGD-CE and APGD-T
    average their loss gradient over that many draws per step (``eot_iter``) and FAB-T
    differentiates the mean logits of that many draws (``model.view(draws=)``); whether
    an attack succeeded is judged on one draw, as AutoAttack judges it.

    Args:
        iterations: of APGD-CE, APGD-T and FAB-T (standard: 100).
        queries: of its Square (standard: 5,000).
        target_classes: of APGD-T and FAB-T (standard: 9).
        eot_draws: shared (``EvaluationConfig.eot_draws``), not part of the spec.

    Its spec: ``autoattack:iterations=100,queries=5000,target_classes=9``; smaller budgets are
    recorded with every result and marked non-standard."""

    label: ClassVar[str] = "AA"
    takes: ClassVar[tuple[str, ...]] = ("eot_draws",)
    budgets: ClassVar[Mapping[str, str]] = {
        "iterations": "AutoAttack APGD/FAB iterations",
        "queries": "AutoAttack Square queries",
        "target_classes": "AutoAttack target classes",
    }
    iterations: int = 100
    queries: int = 5000
    target_classes: int = 9
    eot_draws: int = 1

    def __post_init__(self) -> None:
        AutoAttackSettings(self.iterations, self.queries, self.target_classes)  # validates

    @property
    def settings(self) -> AutoAttackSettings:
        """The budget as ``run_standard_autoattack`` takes it."""
        return AutoAttackSettings(self.iterations, self.queries, self.target_classes)

    def run(
        self,
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        xt = torch.as_tensor(x, device=model.device)
        yt = torch.as_tensor(y, device=model.device)
        fab = model.view(draws=self.eot_draws) if self.eot_draws > 1 else None
        outcome = run_standard_autoattack(
            NonFiniteAsWrong(model, xt, yt, threat.eps, threat.norm), xt, yt,
            threat.eps, self.settings, model.nb_classes, seeds, self.eot_draws,
            None if fab is None else NonFiniteAsWrong(fab, xt, yt, threat.eps, threat.norm),
            threat.norm,
        )  # fmt: skip
        extras = {f"after/{k}": v for k, v in outcome.after.items()}
        extras["broken_by"] = outcome.broken_by
        return AttackOutput(outcome.x_adv, extras)

    def calls(self, threat: ThreatModel, num_classes: int) -> tuple[float, float]:
        """APGD-CE: one gradient per iteration; APGD-T: the same per target; FAB-T: per
        target and iteration one gradient and one forward; Square: one forward per query;
        and the clean check."""
        s = self.settings
        targets = min(s.target_classes, num_classes - 1)
        gradients = s.iterations * (1 + 2 * targets)
        forwards = 1 + 2 * targets + targets * s.iterations + s.queries
        return float(forwards), float(gradients)

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        return {"autoattack": self.settings.describe(), "eot_draws": self.eot_draws}
