"""The per-sample matrix, both aggregations, Wilson intervals and the choices of n* and of
the strongest intermediate attack, on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

from deq_attacks.evaluation import (
    SurvivalMatrix,
    choose_early_exit,
    choose_strongest,
    wilson_interval,
)
from deq_attacks.evaluation.aggregate import tied_best


def hand_made() -> SurvivalMatrix:
    # 2 defenses x 3 columns x 5 samples
    survived = np.array(
        [
            [[1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 1, 1, 0]],  # "final": 3/5, 3/5, 4/5
            [[1, 0, 1, 1, 1], [1, 1, 1, 0, 1], [0, 1, 1, 1, 1]],  # "early": 4/5 each
        ],
        dtype=bool,
    )
    clean = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=bool)
    return SurvivalMatrix(["final", "early"], ["a", "b", "c"], survived, clean)


def test_paper_and_per_sample_aggregations() -> None:
    matrix = hand_made()
    np.testing.assert_allclose(matrix.column_accuracy(), [[0.6, 0.6, 0.8], [0.8, 0.8, 0.8]])
    paper = matrix.paper_worst()
    assert [r.accuracy for r in paper] == [0.6, 0.8]
    # per sample: final survives all three on samples 0, 1 -> 2/5; early only on 2, 4 -> 2/5
    per_sample = matrix.per_sample_worst()
    assert [r.robust for r in per_sample] == [2, 2]
    assert matrix.paper_robustness().defense == "early"
    assert matrix.paper_robustness().accuracy == 0.8
    best = matrix.per_sample_robustness()
    assert (best.defense, best.accuracy) == ("final", 0.4)  # tie: the first defense
    for p, s in zip(paper, per_sample, strict=True):
        assert s.accuracy <= p.accuracy


def test_clean_errors_never_count_as_robust() -> None:
    survived = np.ones((1, 2, 4), dtype=bool)
    clean = np.array([[1, 0, 1, 1]], dtype=bool)
    matrix = SurvivalMatrix(["final"], ["a", "b"], survived, clean)
    assert matrix.paper_robustness().robust == 3 and matrix.per_sample_robustness().robust == 3


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert hand_made().paper_robustness().low == pytest.approx(wilson_interval(4, 5)[0])
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_early_exit_and_strongest_choices() -> None:
    # rows: samples; columns: z_1..z_4 correct under the ready-made attack
    states = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    assert choose_early_exit(states) == 3  # 3/4 correct at z_3
    tie = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    assert tied_best(tie) == [1, 2, 3]
    assert choose_early_exit(tie) == 3  # without clean accuracies: the latest of the tied
    assert choose_early_exit(tie, np.array([0.9, 0.9, 0.5])) == 2  # best clean, then latest
    assert choose_early_exit(tie, np.array([0.3, 0.8, 0.9])) == 3
    all_zero = np.zeros((4, 5), dtype=bool)  # every iterate broken: not the 33% clean z_1
    assert choose_early_exit(all_zero, np.array([0.33, 0.6, 0.8, 0.9, 0.9])) == 5
    with pytest.raises(ValueError, match="clean_accuracy"):
        choose_early_exit(tie, np.array([0.5, 0.5]))
    assert choose_strongest([0.5, 0.3, 0.3, 0.4]) == 1
    with pytest.raises(ValueError):
        choose_strongest([])


def test_matrix_shape_errors() -> None:
    with pytest.raises(ValueError, match="survived"):
        SurvivalMatrix(["a"], ["x", "y"], np.ones((1, 3, 2), bool), np.ones((1, 2), bool))
