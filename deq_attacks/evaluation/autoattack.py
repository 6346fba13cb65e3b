"""The standard AutoAttack (Croce & Hein 2020) through ``pyautoattack`` 0.2.0, with the
per-sample result of each of its four attacks.

``pyautoattack`` carries the original APGD, FAB and Square code (equal to fra31/auto-attack at
a392200 apart from whitespace and imports). We build its ``AutoAttack(version="standard")``,
which sets the original settings (APGD-CE 100 iterations, 1 restart; APGD-T 100 iterations,
9 target classes; FAB-T 100 iterations, 9 target classes; Square 5,000 queries, p_init 0.8),
and run its four attack objects in its order on the samples still robust, as its
``run_standard_evaluation`` does, recording after each attack which samples survive.
The attacks differentiate the torch module they are given: ``estimator.model`` (the
WhiteBoxModule), whose backward is the selected estimate and whose output is the defended
logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from torch import Tensor, nn

#: The four attacks of the standard version, in the order it runs them.
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


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
) -> AutoAttack:
    """``AutoAttack(version="standard")`` on ``model``, with ``settings`` applied."""
    if num_classes < 4:
        raise ValueError(f"the standard AutoAttack needs >= 4 classes (DLR-T), got {num_classes}")
    attack = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
    attack.verbose = False
    targets = min(settings.target_classes, num_classes - 1)
    if settings.iterations != attack.apgd.n_iter:
        # APGD derives its step-size checkpoints from n_iter in its constructor: rebuild
        attack.apgd = APGDAttack(
            attack.model, n_restarts=1, n_iter=settings.iterations, eps=eps, norm="Linf",
            eot_iter=1, rho=0.75, seed=seed, device=device, logger=attack.logger,
        )  # fmt: skip
        attack.apgd_targeted = APGDAttack_targeted(
            attack.model, n_restarts=1, n_iter=settings.iterations, eps=eps, norm="Linf",
            eot_iter=1, rho=0.75, seed=seed, device=device, logger=attack.logger,
        )  # fmt: skip
    attack.apgd_targeted.n_target_classes = targets
    attack.fab.n_iter = settings.iterations
    attack.fab.n_target_classes = targets
    attack.square.n_queries = settings.queries
    return attack


def _run_one(attack: AutoAttack, name: str, x: Tensor, y: Tensor) -> Tensor:
    """One of the four attacks on (x, y), set up as ``run_standard_evaluation`` sets it."""
    if name == "apgd-ce":
        attack.apgd.loss = "ce"
        attack.apgd.seed = attack.get_seed()
        return attack.apgd.perturb(x, y)
    if name == "apgd-t":
        attack.apgd_targeted.seed = attack.get_seed()
        return attack.apgd_targeted.perturb(x, y)
    if name == "fab-t":
        attack.fab.targeted = True
        attack.fab.n_restarts = 1
        attack.fab.seed = attack.get_seed()
        return attack.fab.perturb(x, y)
    if name == "square":
        attack.square.seed = attack.get_seed()
        return attack.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack attack {name!r}")


def run_standard_autoattack(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    settings: AutoAttackSettings,
    num_classes: int,
    seed: int = 0,
) -> AutoAttackOutcome:
    """The standard AutoAttack on one batch, recording each attack's per-sample result.

    Args:
        model: maps inputs (B, ...) in [0, 1] to logits; differentiated by APGD and FAB.
        x, y: the batch and its labels (on the model's device).
        eps: L-inf budget.
        settings: iterations, queries and target classes (default: the standard ones).
        num_classes: number of classes of the model.
        seed: AutoAttack's seed (each attack reseeds torch with it).
    """
    attack = build_standard(model, eps, settings, num_classes, seed, x.device)
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    broken_by = np.where(robust.cpu().numpy(), "", "clean").astype(object)
    x_adv = x.clone()
    after: dict[str, np.ndarray] = {}
    for name in attack.attacks_to_run:
        index = torch.nonzero(robust).flatten()
        if index.numel():
            adv = _run_one(attack, name, x[index].clone(), y[index].clone())
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[index]
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
