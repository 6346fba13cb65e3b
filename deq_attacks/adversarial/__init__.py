"""The attack layer under training and evaluation: the one torch fixed-step PGD, its random
starts, per-sample seeds, the precision attacks run in, and the defended model over a
``WhiteBoxModule`` (the torch module and loss gradient that attacks differentiate)."""

from deq_attacks.adversarial.defended import (
    DefendedModel,
    NonFiniteAsWrong,
    as_defended,
    check_draws,
)
from deq_attacks.adversarial.pgd import (
    ART_NORMS,
    NORMS,
    STEPS,
    Gradient,
    art_random_start,
    compiled,
    compiled_step,
    l2_step,
    pgd,
    random_start,
    signed_step,
)
from deq_attacks.adversarial.precision import PRECISIONS, precision
from deq_attacks.adversarial.seeds import SampleSeeds

__all__ = [
    "ART_NORMS",
    "NORMS",
    "PRECISIONS",
    "STEPS",
    "DefendedModel",
    "Gradient",
    "NonFiniteAsWrong",
    "SampleSeeds",
    "art_random_start",
    "as_defended",
    "check_draws",
    "compiled",
    "compiled_step",
    "l2_step",
    "pgd",
    "precision",
    "random_start",
    "signed_step",
]
