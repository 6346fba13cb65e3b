"""Sanity check in the spirit of the paper's Tables 5-6, at small scale: a standard-trained DEQ
has no robustness, so ART's PGD through EVERY gradient estimate drives its accuracy to about 0.

The tiny conv DEQ of ``attack_fixtures`` (trained with ``DEQEstimator.fit``) is attacked on 100
held-out real 8x8 digits at the usual MNIST threat model: L-inf eps 0.3, step 0.05, 10 steps,
no random start (PGD-10). Run with ``-s`` to see the table.

On this model and these digits, PGD-10 with eps 0.2 (step 0.04) left every estimate at <= 6%,
and eps 0.1 (step 0.02) left 37% (Exact) to 64% (GradientEnsemble(Adjoint)): at eps 0.3 all
fall to about 0, the assertion below.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from art.attacks.evasion import ProjectedGradientDescent
from attack_fixtures import (
    THRESHOLD,
    assert_valid_adversarial,
    defended_predictions,
    digits_deq,
    make_estimator,
)

from deq_attacks import (
    Adjoint,
    AdjointBroyden,
    Ensemble,
    Exact,
    Final,
    GradientEnsemble,
    GradientEstimate,
    Phantom,
    Readout,
    Unrolled,
)

EPS = 0.3
STEP = 0.05
STEPS = 10
N_IMAGES = 100

CASES: list[tuple[str, GradientEstimate, Readout]] = [
    ("Exact", Exact(), Final()),
    ("Phantom(5, 0.5)", Phantom(k=5, lam=0.5), Final()),
    (f"Unrolled(n={THRESHOLD}, k=1, lam=1)", Unrolled(n=THRESHOLD, k=1, lam=1.0), Final()),
    ("Adjoint(beta=0.5)", Adjoint(beta=0.5), Final()),
    ("AdjointBroyden()", AdjointBroyden(), Final()),
    ("GradientEnsemble(Adjoint())", GradientEnsemble(Adjoint()), Final()),
    ("GradientEnsemble(Unrolled())", GradientEnsemble(Unrolled()), Final()),
    ("GradientEnsemble(Adjoint())", GradientEnsemble(Adjoint()), Ensemble()),
    ("GradientEnsemble(Unrolled())", GradientEnsemble(Unrolled()), Ensemble()),
]


@pytest.fixture(scope="module")
def table() -> Iterator[list[tuple[str, str, float, float]]]:
    """Rows (estimate, defense, clean accuracy, PGD accuracy), printed after the module."""
    rows: list[tuple[str, str, float, float]] = []
    yield rows
    print(f"\nART PGD-{STEPS}, L-inf eps {EPS}, step {STEP}, {N_IMAGES} held-out digits")
    print(f"{'estimate':<36}{'defense':<12}{'clean':>7}{'PGD':>7}")
    for estimate, defense, clean, robust in rows:
        print(f"{estimate:<36}{defense:<12}{clean:>7.2f}{robust:>7.2f}")


def _held_out() -> tuple[np.ndarray, np.ndarray]:
    model = digits_deq()
    return model.x_test[:N_IMAGES], model.y_test[:N_IMAGES]


@pytest.mark.parametrize(
    ("name", "estimate", "defense"),
    CASES,
    ids=[f"{name}-{type(defense).__name__}" for name, _, defense in CASES],
)
def test_standard_trained_deq_falls_to_pgd_with_every_estimate(
    table: list[tuple[str, str, float, float]],
    name: str,
    estimate: GradientEstimate,
    defense: Readout,
) -> None:
    x, y = _held_out()
    estimator = make_estimator(estimate, defense)
    clean = float((estimator.predict(x).argmax(1) == y).mean())
    assert clean >= 0.85
    attack = ProjectedGradientDescent(
        estimator,
        eps=EPS,
        eps_step=STEP,
        max_iter=STEPS,
        num_random_init=0,
        batch_size=N_IMAGES,
        verbose=False,
    )
    adv = attack.generate(x, y)
    assert_valid_adversarial(adv, x, EPS)
    assert estimator.white_box.backward_calls == STEPS
    robust = float((defended_predictions(adv, defense=defense) == y).mean())
    table.append((name, type(defense).__name__, clean, robust))
    assert robust <= 0.10
