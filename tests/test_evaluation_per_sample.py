"""Each column's per-sample result depends on the sample alone: not on its batch size, nor on
the other samples of its batch (dropped ones included). Shown on a DEQ whose forward is
batch-invariant to the bit, so that any difference comes from the attack's own randomness."""

from __future__ import annotations

from dataclasses import asdict
from functools import cache

import numpy as np
import pytest
import torch
from evaluation_fixtures import splits, tiny_estimator
from pyautoattack.square import SquareAttack

from deq_attacks import Unrolled
from deq_attacks.evaluation import AutoAttackSettings, SampleSeeds, ThreatModel
from deq_attacks.evaluation.attacks import (
    Attack,
    DefendedModel,
    FixedStepPGD,
    Square,
    StandardAutoAttack,
)
from deq_attacks.evaluation.attacks.per_sample import RowTracker

THREAT = ThreatModel(eps=0.1, step=0.05, steps=3)
SMALL = AutoAttackSettings(iterations=3, queries=15, target_classes=2)
ATTACKS: dict[str, Attack] = {
    "pgd": FixedStepPGD(),
    "autoattack": StandardAutoAttack(**asdict(SMALL)),
    "square": Square(queries=30),
}
N = 12


@cache
def model():
    estimator = tiny_estimator(trained=True, batch_invariant=True)
    return DefendedModel.of(estimator, Unrolled(1, 1, 1.0))


def data() -> tuple[np.ndarray, np.ndarray]:
    (x, y), _ = splits(N, 1)
    return x, y


def run(attack: Attack, rows: np.ndarray, seed: int = 0) -> np.ndarray:
    x, y = data()
    seeds = SampleSeeds(seed, "column", rows)
    return attack.run(model(), x[rows], y[rows], THREAT, seeds).x_adv


@cache
def whole(name: str) -> np.ndarray:
    return run(ATTACKS[name], np.arange(N))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_result_does_not_depend_on_the_batch_size(name: str) -> None:
    attack, full = ATTACKS[name], whole(name)
    parts = [run(attack, rows) for rows in np.array_split(np.arange(N), [5, 7])]  # 5, 2, 5
    np.testing.assert_array_equal(np.concatenate(parts), full)
    x, y = data()
    assert np.abs(full - x).max() > 0.05  # the attack moved the images
    assert np.abs(full - x).max() <= THREAT.eps + 1e-6
    if name == "autoattack":  # some samples went through all four attacks
        extras = ATTACKS[name].run(model(), x, y, THREAT, SampleSeeds.first(0, "column", N)).extras
        assert extras["after/square"].any() and extras["after/apgd-ce"].sum() < N


@pytest.mark.parametrize("name", list(ATTACKS))
def test_result_does_not_depend_on_the_other_samples(name: str) -> None:
    attack, full = ATTACKS[name], whole(name)
    kept = np.array([1, 4, 5, 10])  # the others dropped (as a cascade drops broken samples)
    np.testing.assert_array_equal(run(attack, kept), full[kept])
    np.testing.assert_array_equal(run(attack, kept[::-1]), full[kept[::-1]])  # any order


def test_the_seed_and_the_column_change_the_draws() -> None:
    full = whole("square")
    assert not np.array_equal(run(ATTACKS["square"], np.arange(N), seed=1), full)
    seeds = SampleSeeds(0, "column", np.arange(3))
    assert seeds.sample_seed(0, "s") != SampleSeeds(0, "other", np.arange(3)).sample_seed(0, "s")
    assert seeds.sample_seed(0, "s") != seeds.sample_seed(1, "s")
    assert seeds.subset(np.array([2])).sample_seed(0, "s") == seeds.sample_seed(2, "s")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        SampleSeeds(-1, "c", np.arange(2))


def test_pyautoattacks_own_square_depends_on_the_batch() -> None:
    """The control: without per-sample draws, the same samples get other results in other
    batches (what the subclasses remove)."""
    x, y = data()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def plain(rows: np.ndarray) -> np.ndarray:
        attack = SquareAttack(model(), norm="Linf", n_queries=30, eps=THREAT.eps,
                              p_init=0.8, n_restarts=1, seed=0, verbose=False, device="cpu",
                              resc_schedule=True)  # fmt: skip
        return attack.perturb(xt[rows], yt[rows]).numpy()

    full = plain(np.arange(N))
    parts = np.concatenate([plain(rows) for rows in np.array_split(np.arange(N), [5, 7])])
    assert not np.array_equal(parts, full)


def test_rows_are_matched_and_checked() -> None:
    x = torch.tensor([[0.0], [1.0], [0.0], [2.0]])
    y = torch.tensor([0, 1, 0, 2])
    tracker = RowTracker(x, y, SampleSeeds(0, "c", np.arange(4)), "s")
    # equal samples with equal labels: matched in order
    np.testing.assert_array_equal(tracker.rows(x[[0, 2, 3]], y[[0, 2, 3]]), [0, 2, 3])
    tracker.robust(np.array([0, 2, 3]), torch.tensor([True, False, True]))
    np.testing.assert_array_equal(tracker.rows(x[[0, 3]], y[[0, 3]]), [0, 3])
    tracker.robust(np.array([0, 3]), torch.tensor([True, True]))
    with pytest.raises(RuntimeError, match="not the ones still robust"):
        tracker.rows(x[[1, 3]], y[[1, 3]])
