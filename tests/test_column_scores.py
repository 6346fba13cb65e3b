"""``column_scores``: one column of the protocol on its own gives the protocol's own cells (the
same per-sample seeds and blocks), clean, for the shared PGD (every defense and iterate from
one run) and for a per-defense attack (Square)."""

from __future__ import annotations

import dataclasses

import numpy as np
from evaluation_fixtures import SQUARE, TINY, splits, tiny_estimator

from deq_attacks.deq.readout import Early, Ensemble, Final
from deq_attacks.evaluation import (
    SweepConfig,
    column_scores,
    evaluate_model,
    protocol_columns,
)
from deq_attacks.gradients import ready_made

CHEAP = dataclasses.replace(
    TINY,
    attacks=f"pgd,{SQUARE}",
    bptt=False,
    sweep=SweepConfig(
        {"adjoint": {"n": "1", "beta": "1.0"}, "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}
    ),
)


def test_a_column_on_its_own_equals_the_protocols_cells() -> None:
    estimator = tiny_estimator(trained=True)
    dev, (x, y) = splits()
    report = evaluate_model(estimator, (x, y), dev, CHEAP)
    defenses = {"final": Final(), "early": Early(report.early_exit), "ensemble": Ensemble()}
    assert set(report.defenses) == set(defenses)

    clean = column_scores(estimator, x, y, CHEAP, defenses=defenses)
    for d in defenses:
        assert clean.correct[d].tolist() == report.clean[d]
    assert np.allclose(clean.per_state(), report.states["clean_accuracy"])

    estimates = {"ready-made": ready_made(estimator.deq.training_gradient)}
    columns = {c.label: c for c in protocol_columns(estimates, CHEAP)}
    assert set(columns) == {"ready-made PGD", "square"}
    pgd = column_scores(estimator, x, y, CHEAP, columns["ready-made PGD"], defenses)
    square = column_scores(estimator, x, y, CHEAP, columns["square"], defenses)
    for d in defenses:
        assert pgd.correct[d].tolist() == report.survived[d]["ready-made PGD"]
        assert square.correct[d].tolist() == report.survived[d]["square"]
    assert np.allclose(pgd.per_state(), report.states["ready_made_accuracy"])
    assert square.states is None  # Square runs once per defense: no shared iterates
    # the default defense is the final state
    final = column_scores(estimator, x, y, CHEAP, columns["ready-made PGD"])
    assert set(final.correct) == set(final.finite) == {"final"} and final.states is not None
    assert final.correct["final"].tolist() == report.survived["final"]["ready-made PGD"]
