"""The attack columns of the protocol, one module per attack, registered by name.

``pgd`` (the fixed-step, loss-aware PGD: the shared run), ``autoattack`` (the standard
AutoAttack, pyautoattack), ``square`` (Square, pyautoattack), ``apgd_ce`` and ``apgd_dlr``
(ART's APGD), ``art_autoattack`` (ART's own AutoAttack list) and ``transfer`` (APGD on a
surrogate: the DEQ unrolled, or the user's model); ``-`` in a name reads as ``_``. Each is
built from its spec text with its own budget (``"autoattack:iterations=100,queries=5000"``).
A new attack is one module (its ``Attack`` dataclass with ``@register_attack``) plus one
import here.
"""

from deq_attacks.adversarial import PRECISIONS, DefendedModel, SampleSeeds, precision
from deq_attacks.evaluation.attacks.art import (
    ArtAPGDCE,
    ArtAPGDDLR,
    ArtAutoAttackList,
)
from deq_attacks.evaluation.attacks.autoattack import StandardAutoAttack, run_standard_autoattack
from deq_attacks.evaluation.attacks.base import (
    ATTACKS,
    SHARED,
    Attack,
    AttackOutput,
    Column,
    attack_class,
    attack_names,
    attack_text,
    column_label,
    parse_attack,
    parse_attacks,
    register_attack,
    scoped_attacks,
)
from deq_attacks.evaluation.attacks.pgd import FixedStepPGD, fixed_step_pgd
from deq_attacks.evaluation.attacks.square import Square
from deq_attacks.evaluation.attacks.transfer import TransferAPGD, UnrolledSurrogate
from deq_attacks.evaluation.threat import AutoAttackSettings, ThreatModel

__all__ = [
    "ATTACKS",
    "PRECISIONS",
    "SHARED",
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
    "attack_text",
    "column_label",
    "fixed_step_pgd",
    "parse_attack",
    "parse_attacks",
    "precision",
    "register_attack",
    "run_standard_autoattack",
    "scoped_attacks",
]
