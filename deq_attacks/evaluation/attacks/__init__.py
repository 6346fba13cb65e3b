"""The attack columns of the protocol, one module per attack, registered by name.

``pgd`` (the fixed-step, loss-aware PGD: the shared run), ``autoattack`` (the standard
AutoAttack, pyautoattack), ``square`` (Square, pyautoattack), ``apgd-ce`` and ``apgd-dlr``
(ART's APGD), ``art-autoattack`` (ART's own AutoAttack list) and ``transfer`` (APGD on a
surrogate: the DEQ unrolled, or the user's model). A new attack is one module
(its ``Attack`` class with ``@register_attack``) plus one import here.
"""

from deq_attacks.adversarial import PRECISIONS, DefendedModel, SampleSeeds, precision
from deq_attacks.evaluation.attacks.art import (
    ArtAPGDCE,
    ArtAPGDDLR,
    ArtAutoAttackList,
)
from deq_attacks.evaluation.attacks.autoattack import StandardAutoAttack, run_standard_autoattack
from deq_attacks.evaluation.attacks.base import (
    Attack,
    AttackOutput,
    Column,
    attack_class,
    attack_names,
    column_label,
    parse_attacks,
    register_attack,
    scoped_attacks,
)
from deq_attacks.evaluation.attacks.pgd import FixedStepPGD, fixed_step_pgd
from deq_attacks.evaluation.attacks.square import Square
from deq_attacks.evaluation.attacks.transfer import TransferAPGD, UnrolledSurrogate
from deq_attacks.evaluation.threat import AutoAttackSettings, ThreatModel

__all__ = [
    "PRECISIONS",
    "ArtAPGDCE",
    "ArtAPGDDLR",
    "ArtAutoAttackList",
    "Attack",
    "AttackOutput",
    "AutoAttackSettings",
    "Column",
    "DefendedModel",
    "FixedStepPGD",
    "SampleSeeds",
    "Square",
    "StandardAutoAttack",
    "ThreatModel",
    "TransferAPGD",
    "UnrolledSurrogate",
    "attack_class",
    "attack_names",
    "column_label",
    "fixed_step_pgd",
    "parse_attacks",
    "precision",
    "register_attack",
    "run_standard_autoattack",
    "scoped_attacks",
]
