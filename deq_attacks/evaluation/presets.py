"""Named settings of ``deq-attacks evaluate`` (``--preset``): the threat model and the attack
budgets of a data set (the attacks' budgets in their spec text, ``"autoattack:iterations=100"``),
so that a user does not set a dozen options by hand. Options given
explicitly still override a preset; the sweep grid is not part of a preset.

- ``cifar10_paper``: the paper's CIFAR-10 evaluation (Sec. 6.2, Appendix A): L-inf eps 8/255,
  PGD step 2/255, 10 steps; the standard AutoAttack (APGD-CE, APGD-T and FAB-T with 100
  iterations and 9 target classes, Square with 5,000 queries), Square with 5,000 queries,
  PGD-100 for the more-steps check. These are also ``EvaluationConfig``'s defaults.
- ``mnist``: the MNIST threat model of Madry et al. (2018, "Towards Deep Learning Models
  Resistant to Adversarial Attacks"): eps 0.3, PGD with step 0.01 and 40 steps (their
  adversary; 40 x 0.01 reaches the boundary of the ball), PGD-100 for the more-steps check
  (their longer evaluation attack); the standard AutoAttack at eps 0.3 as Croce & Hein (2020)
  and RobustBench evaluate MNIST. The large-eps check stays at 0.5.
- ``cifar10_l2``: RobustBench's CIFAR-10 L2 threat model: eps 0.5; PGD with step 0.125 and 10
  steps (Madry et al.'s rule, step = 2.5 eps / steps, so the steps can cross the ball), the
  standard AutoAttack and Square (5,000 queries) under L2 as RobustBench runs them, PGD-100
  for the more-steps check, and the large-eps check at L2 8.0 (16 times eps, the ratio of
  the L-inf ones: 0.5 / (8/255) is about 16).
- ``digits``: the demo's values on the embedded 8x8 digits (``deq-attacks demo``): eps 0.1,
  step 0.025, 10 steps, a reduced AutoAttack (5 iterations, 2 target classes, 50 Square
  queries; recorded as not standard), Square with 100 queries, PGD-50 for the check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.registry import Registry


@dataclass(frozen=True)
class EvaluationPreset:
    """A named set of ``EvaluationConfig`` settings, checked at construction."""

    name: str
    summary: str
    settings: Mapping[str, Any]

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(EvaluationConfig)} - {"sweep"}
        unknown = sorted(set(self.settings) - known)
        if unknown:
            raise ValueError(
                f"preset {self.name!r}: unknown settings {unknown}; known: {sorted(known)}"
            )
        EvaluationConfig(**self.settings)  # validates the values
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    def apply(self, config: EvaluationConfig) -> EvaluationConfig:
        """``config`` with this preset's settings."""
        return dataclasses.replace(config, **self.settings)


#: The standard AutoAttack and Square budgets, written out in the spec text.
_STANDARD_ATTACKS = (
    "pgd,autoattack:iterations=100,queries=5000,target_classes=9,square:queries=5000"
)

#: Every evaluation preset, by name.
PRESETS: Registry[EvaluationPreset] = Registry("evaluation preset")
for _preset in (
    EvaluationPreset(
        "cifar10_paper",
        "the paper's CIFAR-10 setting: eps 8/255, step 2/255, 10 steps, standard AutoAttack",
        {
            "eps": 8 / 255,
            "step": 2 / 255,
            "steps": 10,
            "attacks": _STANDARD_ATTACKS,
            "long_steps": 100,
            "large_eps": 0.5,
            "norm": "Linf",
        },
    ),
    EvaluationPreset(
        "cifar10_l2",
        "RobustBench's CIFAR-10 L2: eps 0.5, step 0.125, 10 steps, standard AutoAttack",
        {
            "norm": "L2",
            "eps": 0.5,
            "step": 0.125,
            "steps": 10,
            "attacks": _STANDARD_ATTACKS,
            "long_steps": 100,
            "large_eps": 8.0,
        },
    ),
    EvaluationPreset(
        "mnist",
        "MNIST (Madry et al. 2018): eps 0.3, step 0.01, 40 steps, standard AutoAttack",
        {
            "eps": 0.3,
            "step": 0.01,
            "steps": 40,
            "attacks": _STANDARD_ATTACKS,
            "long_steps": 100,
            "large_eps": 0.5,
            "norm": "Linf",
        },
    ),
    EvaluationPreset(
        "digits",
        "the demo on the 8x8 digits: eps 0.1, step 0.025, 10 steps, reduced AutoAttack",
        {
            "eps": 0.1,
            "step": 0.025,
            "steps": 10,
            "attacks": "pgd,autoattack:iterations=5,queries=50,target_classes=2,square:queries=100",
            "long_steps": 50,
            "large_eps": 0.5,
            "norm": "Linf",
        },
    ),
):
    PRESETS.add(_preset.name, _preset)


def evaluation_preset(name: str) -> EvaluationPreset:
    """The preset ``name``; an unknown name raises listing the presets."""
    return PRESETS[name]
