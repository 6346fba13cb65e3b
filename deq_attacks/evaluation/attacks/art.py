"""ART's attacks as columns: APGD-CE and APGD-DLR (``AutoProjectedGradientDescent``), and ART's
own ``AutoAttack`` list (APGD-CE/DLR, DeepFool, Square: another attack set than the standard
AutoAttack, kept under its own name).

Each column wraps the protocol's ``DefendedModel`` in a ``PyTorchClassifier`` of its own
(inputs in [0, 1], the preprocessing inside the module), so these attacks receive the column's
estimate through the module's backward; ART is their source, not the protocol's model. ART
draws its random numbers from numpy's global generator for a whole batch; here each sample is
attacked in its own call with numpy seeded from the sample's seeds, so its result does not
depend on its batch (one sample per call is slower; these columns are not in the default
list). ART converts logits to numpy, so these columns run in float32 only. Under L2 they run
ART's L2 variants (``norm=2``).

With ``eot_draws`` > 1 the classifier wraps ``model.view(draws=)``: ART builds its own
classifier over the module and never averages gradients itself, so its loss is taken at the
mean logits of that many draws (their Jacobian is the mean of the draws').
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from art.attacks.evasion import AutoAttack as ArtAutoAttack
from art.attacks.evasion import AutoProjectedGradientDescent, DeepFool, SquareAttack
from art.estimators.classification import PyTorchClassifier

from deq_attacks.adversarial.pgd import ART_NORMS
from deq_attacks.adversarial.seeds import SampleSeeds
from deq_attacks.evaluation.attacks.base import Attack, AttackOutput, register_attack
from deq_attacks.evaluation.threat import ThreatModel
from deq_attacks.interfaces import art_device_type

if TYPE_CHECKING:
    from art.attacks.attack import EvasionAttack

    from deq_attacks.adversarial.defended import DefendedModel


def check_steps(steps: int | None) -> None:
    """An ART attack's iterations: an int >= 1, or None (the threat model's / ART's)."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1 or none, got {steps!r}")


class _PerSampleArt(Attack):
    """An ART evasion attack run one sample at a time, numpy seeded per sample."""

    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    eot_draws: int

    @abstractmethod
    def build(self, model: PyTorchClassifier, threat: ThreatModel) -> EvasionAttack:
        """The ART attack over ``model`` (batch size 1)."""

    def target(self, model: DefendedModel) -> PyTorchClassifier:
        """ART's classifier over ``model`` (inputs in [0, 1], its preprocessing inside, its
        loss), over the mean logits of ``eot_draws`` draws."""
        return PyTorchClassifier(
            model.view(draws=self.eot_draws), model.loss, model.input_shape, model.nb_classes,
            clip_values=(0.0, 1.0), device_type=art_device_type(model.device),
        )  # fmt: skip

    def run(
        self,
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        attack = self.build(self.target(model), threat)
        labels = np.eye(model.nb_classes, dtype=np.float32)[y]
        x_adv = np.empty_like(x)
        state = np.random.get_state()
        try:
            for j in range(len(x)):
                np.random.seed(seeds.numpy_seed(j, self.name))
                x_adv[j] = attack.generate(x[j : j + 1], labels[j : j + 1])[0]
        finally:
            np.random.set_state(state)
        return AttackOutput(x_adv.astype(np.float32))


@dataclass(frozen=True)
class _ArtAPGD(_PerSampleArt):
    """ART's APGD with ``steps`` iterations (None: the threat model's) and ``loss``; its spec:
    ``apgd_ce:steps=100``; ``eot_draws`` is shared."""

    steps: int | None = None
    eot_draws: int = 1
    loss: ClassVar[str]
    takes: ClassVar[tuple[str, ...]] = ("eot_draws",)

    def __post_init__(self) -> None:
        check_steps(self.steps)

    def build(self, model: PyTorchClassifier, threat: ThreatModel) -> EvasionAttack:
        return AutoProjectedGradientDescent(
            model, norm=ART_NORMS[threat.norm], eps=threat.eps, eps_step=threat.step,
            max_iter=self.budget(threat), batch_size=1, loss_type=self.loss, verbose=False,
        )  # fmt: skip

    def budget(self, threat: ThreatModel) -> int:
        return threat.steps if self.steps is None else self.steps

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        return {
            "budget": self.budget(threat), "step": threat.step, "loss": self.loss,
            "eot_draws": self.eot_draws,
        }  # fmt: skip


@register_attack("apgd_ce")
@dataclass(frozen=True)
class ArtAPGDCE(_ArtAPGD):
    """ART's APGD on the cross-entropy."""

    label: ClassVar[str] = "APGD-CE"
    loss: ClassVar[str] = "cross_entropy"


@register_attack("apgd_dlr")
@dataclass(frozen=True)
class ArtAPGDDLR(_ArtAPGD):
    """ART's APGD on the difference-of-logits ratio."""

    label: ClassVar[str] = "APGD-DLR"
    loss: ClassVar[str] = "difference_logits_ratio"


@register_attack("art_autoattack")
@dataclass(frozen=True)
class ArtAutoAttackList(_PerSampleArt):
    """ART's ``AutoAttack`` list. ``steps`` None keeps ART's defaults (APGD 100 iterations,
    DeepFool, Square 5,000 queries); ``steps`` sets the APGD and DeepFool iterations and
    50 x steps Square queries (ART's ratio 100 : 5,000)."""

    label: ClassVar[str] = "ART-AA"
    takes: ClassVar[tuple[str, ...]] = ("eot_draws",)
    steps: int | None = None
    eot_draws: int = 1

    def __post_init__(self) -> None:
        check_steps(self.steps)

    def build(self, model: PyTorchClassifier, threat: ThreatModel) -> EvasionAttack:
        norm = ART_NORMS[threat.norm]
        if threat.norm == "L2" and min(model.input_shape[-2:]) < 10:
            raise ValueError(
                f"ART's L2 Square divides by zero on images under 10 pixels a side (its tiles "
                f"are side // 5 < 2 pixels; these are {model.input_shape}): under L2 use the "
                "standard AutoAttack ('autoattack') or ART's APGD ('apgd_ce', 'apgd_dlr')"
            )
        if self.steps is None:
            return ArtAutoAttack(model, norm=norm, eps=threat.eps, eps_step=threat.step,
                                 batch_size=1)  # fmt: skip
        apgd = [
            AutoProjectedGradientDescent(
                model,
                norm=norm,
                eps=threat.eps,
                eps_step=threat.step,
                max_iter=self.steps,
                nb_random_init=5,
                batch_size=1,
                loss_type=loss,
                verbose=False,
            )  # fmt: skip
            for loss in ("cross_entropy", "difference_logits_ratio")
        ]
        deepfool = DeepFool(model, max_iter=self.steps, epsilon=1e-3, nb_grads=10, batch_size=1)
        square = SquareAttack(
            model, norm=norm, max_iter=50 * self.steps, eps=threat.eps, p_init=0.8,
            nb_restarts=5,
        )  # fmt: skip
        return ArtAutoAttack(model, norm=norm, eps=threat.eps, eps_step=threat.step,
                             attacks=[*apgd, deepfool, square], batch_size=1)  # fmt: skip

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        budget = "ART defaults (APGD 100)" if self.steps is None else self.steps
        return {"budget": budget, "step": threat.step, "eot_draws": self.eot_draws}
