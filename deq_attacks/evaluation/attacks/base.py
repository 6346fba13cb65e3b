"""The attack-column protocol and the registry of attacks by name.

An attack is one module: a class implementing ``Attack`` and registered under a short name::

    @register_attack("my-attack")
    @dataclass(frozen=True)
    class MyAttack(Attack):
        label: ClassVar[str] = "MINE"          # the column is "<estimate> MINE"
        steps: int = 10

        @classmethod
        def from_config(cls, config): return cls(config.steps)
        def run(self, model, x, y, threat, seeds): ...   # -> AttackOutput
        def describe(self, threat): return {"budget": self.steps}

plus one import in ``deq_attacks/evaluation/attacks/__init__.py``. ``EvaluationConfig.attacks``
names the attacks a protocol runs; the columns, the command line's choices and the error
messages come from this registry. ``scoped_attacks()`` undoes registrations made inside it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from deq_attacks.adversarial.seeds import SampleSeeds
from deq_attacks.evaluation.threat import ThreatModel
from deq_attacks.gradients import GradientEstimate, estimate_spec

if TYPE_CHECKING:
    from deq_attacks.evaluation.settings import EvaluationConfig
    from deq_attacks.interfaces import DEQEstimator


@dataclass
class AttackOutput:
    """What one attack run on a block returns.

    Attributes:
        x_adv: (B, ...) float32 in [0, 1]: the adversarial example of each sample (the clean
            input where the attack found none).
        extras: name -> per-sample array (B,) recorded with the results (e.g. AutoAttack's
            survival after each of its attacks).
    """

    x_adv: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)


class Attack(ABC):
    """One attack algorithm of the protocol, configured by ``from_config``.

    Class attributes:
        name: the registered name (set by ``register_attack``).
        label: the column label: ``"<estimate label> <label>"``, or ``label`` alone for an
            attack that uses no gradient.
        shared: True only for an attack whose adversaries do not depend on the defense (it
            never looks at the defended output: the fixed-step, loss-aware PGD); one run then
            scores every defense and every iterate.
        uses_estimate: whether the attack differentiates the model (one column per gradient
            estimate) or only queries it (one column).
        precisions: the arithmetic it can run its forwards and backwards in ("fp32", "bf16").
    """

    name: ClassVar[str] = ""
    label: ClassVar[str]
    shared: ClassVar[bool] = False
    uses_estimate: ClassVar[bool] = True
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")

    @classmethod
    @abstractmethod
    def from_config(cls, config: EvaluationConfig) -> Attack:
        """This attack with the budgets of ``config``."""

    @abstractmethod
    def run(
        self,
        model: DEQEstimator,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        """Attack one block.

        Args:
            model: the estimator view with the column's estimate and the defense fixed.
            x, y: images (B, ...) float32 in [0, 1] and labels (B,).
            threat: the threat model (eps, step, steps).
            seeds: the per-sample seeds of the block: a sample's draws must come from its own
                seeds only, so that its result does not depend on the rest of the block.
        """

    @abstractmethod
    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        """This attack's settings as JSON (written beside its column's results)."""

    def calls(self, threat: ThreatModel, num_classes: int) -> tuple[float, float] | None:
        """(forward calls, gradient calls) of the model per sample that survives the whole
        attack (the most it costs; a sample broken early may cost less), from the settings;
        None where unknown (the cost estimate then leaves the column out and says so)."""
        return None


A = TypeVar("A", bound=type[Attack])

_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str) -> Callable[[A], A]:
    """Class decorator: make an ``Attack`` known under ``name`` (lower case, digits, '-')."""
    if not name or not name.replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"an attack name is lower-case letters, digits and '-', got {name!r}")

    def register(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise TypeError(f"register_attack takes an Attack subclass, got {cls!r}")
        if not getattr(cls, "label", ""):
            raise TypeError(f"{cls.__name__} needs a column label (class attribute 'label')")
        known = _ATTACKS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"an attack named {name!r} is already registered ({known.__name__})")
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return register


def attack_names() -> list[str]:
    """The registered attacks, in registration order."""
    return list(_ATTACKS)


def attack_class(name: str) -> type[Attack]:
    """The attack registered as ``name``; an unknown name raises listing the attacks."""
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(_ATTACKS)}")
    return _ATTACKS[name]


def parse_attacks(text: str) -> tuple[str, ...]:
    """Registered attack names from ``"pgd,autoattack,square"`` (no repeats, at least one)."""
    if not isinstance(text, str):
        raise TypeError(f"attacks is a comma-separated text of names, got {text!r}")
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError(f"no attack named in {text!r}; choose from {', '.join(_ATTACKS)}")
    for name in names:
        attack_class(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"attacks named twice: {', '.join(repeated)}")
    return names


@contextmanager
def scoped_attacks() -> Iterator[None]:
    """Attacks registered inside are unregistered on exit (tests, experiments)."""
    saved = dict(_ATTACKS)
    try:
        yield
    finally:
        _ATTACKS.clear()
        _ATTACKS.update(saved)


@dataclass(frozen=True)
class Column:
    """One column of the evaluation table: an attack, the gradient it receives, a label.

    Args:
        label: the column's name in tables and the key of its results.
        attack: the configured attack.
        estimate: the gradient estimate of the column's model view (None for an attack that
            uses no gradient).
    """

    label: str
    attack: Attack
    estimate: GradientEstimate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.attack, Attack):
            raise TypeError(f"attack must be an Attack, got {self.attack!r}")
        if not self.label:
            raise ValueError("a column needs a non-empty label")
        if self.attack.uses_estimate and not isinstance(self.estimate, GradientEstimate):
            raise ValueError(
                f"{self.label}: the {self.attack.name} attack needs a gradient estimate, "
                f"got {self.estimate!r}"
            )
        if not self.attack.uses_estimate and self.estimate is not None:
            raise ValueError(f"{self.label}: the {self.attack.name} attack uses no gradient")

    @property
    def shared(self) -> bool:
        """Whether one run serves every defense: a shared attack with an estimate that does
        not differentiate the defended computation (BPTT does: one run per defense)."""
        return self.attack.shared and not (
            self.estimate is not None and self.estimate.depends_on_defense
        )

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        """The column's settings for result files: the attack's, the estimate and its spec."""
        spec = estimate_spec(self.estimate) if self.estimate is not None else None
        return {
            "attack": self.attack.name,
            "estimate": repr(self.estimate) if self.estimate is not None else None,
            "estimate_spec": spec,
            "eps": threat.eps,
            "norm": threat.norm,
            **self.attack.describe(threat),
        }


def column_label(attack: type[Attack], estimate_label: str | None) -> str:
    """``"<estimate label> <attack label>"``, or the attack's label for a gradient-free one."""
    return f"{estimate_label} {attack.label}" if attack.uses_estimate else attack.label
