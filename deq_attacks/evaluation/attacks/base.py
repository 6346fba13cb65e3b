"""The attack-column protocol and the registry of attacks by name.

An attack is one module: a frozen dataclass implementing ``Attack`` whose fields are its own
budget, registered under a short name::

    @register_attack("mine")
    @dataclass(frozen=True)
    class Mine(Attack):
        label: ClassVar[str] = "MINE"          # the column is "<estimate> MINE"
        budget: int = 10

        def run(self, model, x, y, threat, seeds): ...   # model: a DefendedModel
        def describe(self, threat): return {"budget": self.budget}

plus one import in ``deq_attacks/evaluation/attacks/__init__.py``. The protocol builds it from
its spec text (``--attacks "pgd,mine:budget=3"``, ``EvaluationConfig.attacks``), as solvers
are built (``ATTACKS``, a ``deq_attacks.registry.Registry``; ``-`` in a name reads as ``_``).

What is not one attack's budget reaches it otherwise: the threat model (eps, step, steps,
norm, random start) and the per-sample seeds are arguments of ``run``; the settings every
gradient column shares (``SHARED``: ``eot_draws``, ``compile_backend``, fields of
``EvaluationConfig``) are fields that an attack names in ``takes``: the protocol sets them
(``with_shared``), and they are not part of its spec. ``scoped_attacks()`` undoes
registrations made inside it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from deq_attacks.adversarial.seeds import SampleSeeds
from deq_attacks.evaluation.threat import ThreatModel
from deq_attacks.gradients import GradientEstimate, estimate_spec
from deq_attacks.registry import Registry, split_specs

if TYPE_CHECKING:
    from deq_attacks.adversarial.defended import DefendedModel

#: The protocol's settings that every gradient column shares (``EvaluationConfig``'s fields of
#: these names): an attack that uses one names it in ``takes``.
SHARED = ("eot_draws", "compile_backend")


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
    """One attack algorithm of the protocol: a frozen dataclass whose fields are its budget.

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
        takes: the shared settings (of ``SHARED``) that are fields of this attack, set by the
            protocol (``with_shared``), not by its spec.
        budgets: field -> how a report names it, for each budget whose default is the
            standard value (a smaller value is marked REDUCED).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str]
    shared: ClassVar[bool] = False
    uses_estimate: ClassVar[bool] = True
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")
    takes: ClassVar[tuple[str, ...]] = ()
    budgets: ClassVar[Mapping[str, str]] = {}

    def with_shared(self, **shared: Any) -> Attack:
        """This attack with the shared settings it ``takes`` from ``shared`` (the others are
        ignored: an attack that takes none is returned as it is)."""
        return dataclasses.replace(self, **{k: shared[k] for k in self.takes})  # type: ignore[type-var]

    def budget_marks(self) -> list[tuple[str, int, bool]]:
        """(label, value, standard) of each of ``budgets``: standard when at least the
        field's default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return [
            (label, value := getattr(self, name), value >= defaults[name])
            for name, label in self.budgets.items()
        ]

    @abstractmethod
    def run(
        self,
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        """Attack one block.

        Args:
            model: the defended model (``deq_attacks.adversarial.DefendedModel``) with the
                column's estimate and the defense fixed: a torch module (inputs in [0, 1] to
                logits, differentiable by the estimate), ``loss_gradient(x, labels)`` on
                tensors, ``nb_classes``, ``input_shape``, ``device``; an ART attack wraps it
                in a ``PyTorchClassifier`` itself.
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


def spec_settings(cls: type) -> list[str]:
    """The settings of an attack's spec: its dataclass fields but the shared ones it takes."""
    takes = getattr(cls, "takes", ())
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in takes]


#: Every attack, by name.
ATTACKS: Registry[type[Attack]] = Registry("attack", Attack, parameters=spec_settings)


def register_attack(name: str) -> Callable[[A], A]:
    """Class decorator: make an ``Attack`` dataclass known under ``name`` (lower case, digits,
    '_'; a '-' given later reads as '_')."""
    add = ATTACKS.register(name)

    def register(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise TypeError(f"register_attack takes an Attack subclass, got {cls!r}")
        if not getattr(cls, "label", ""):
            raise TypeError(f"{cls.__name__} needs a column label (class attribute 'label')")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass: its fields are its budget")
        fields = {f.name for f in dataclasses.fields(cls)}
        odd = [n for n in (*cls.takes, *cls.budgets) if n not in fields]
        odd += [n for n in cls.takes if n not in SHARED]
        if odd:
            raise TypeError(
                f"{cls.__name__}: {', '.join(odd)} in takes/budgets is not one of its fields "
                f"(takes: some of {', '.join(SHARED)})"
            )
        add(cls)
        cls.name = name
        return cls

    return register


def attack_names() -> list[str]:
    """The registered attacks, in registration order."""
    return ATTACKS.names()


def attack_class(name: str) -> type[Attack]:
    """The attack registered as ``name``; an unknown name raises listing the attacks."""
    return ATTACKS[name]


def parse_attack(spec: str) -> Attack:
    """One attack from its spec text, e.g. ``"square:queries=100"``."""
    attack: Attack = ATTACKS.create(spec)
    return attack


def attack_text(attack: Attack) -> str:
    """The spec text of ``attack`` (its name and each setting that is not the default)."""
    return ATTACKS.text(attack)


def parse_attacks(text: str) -> tuple[Attack, ...]:
    """The attacks of ``"pgd,autoattack:iterations=100,queries=50,square:queries=5000"``
    (specs split by ``registry.split_specs``; no attack twice, at least one)."""
    specs = split_specs(text)
    if not specs:
        raise ValueError(f"no attack named in {text!r}; choose from {ATTACKS.choices()}")
    attacks = tuple(parse_attack(spec) for spec in specs)
    names = [a.name for a in attacks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"attacks named twice: {', '.join(repeated)}")
    return attacks


def scoped_attacks() -> AbstractContextManager[None]:
    """Attacks registered inside are unregistered on exit (tests, experiments)."""
    return ATTACKS.scoped()


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
