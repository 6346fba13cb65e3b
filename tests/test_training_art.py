"""ART's own trainers on a ``DEQEstimator`` (docs/training.md, "train with ART's own trainers").

- ``AdversarialTrainerMadryPGD`` trains through ``DEQEstimator.fit`` (the DEQ's training
  forward), with adversaries from ART's PGD that use the estimator's selected estimate.
- ``AdversarialTrainerTRADESPyTorch`` calls the estimator's attack-facing module itself
  (``classifier._model``), whose output is the defended logits with no parameter gradient:
  alone it cannot train (the test shows the error); inside ``estimator.white_box.fitting()``
  that module is the training forward and TRADES trains, its PGD still using the estimate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from art.attacks.evasion import ProjectedGradientDescent
from art.defences.trainer import AdversarialTrainerMadryPGD, AdversarialTrainerTRADESPyTorch

from deq_attacks import Broyden, DEQEstimator, PhantomGradient, Unrolled
from deq_attacks.data import load_digits
from deq_attacks.models import small_conv_deq

SELECTED = Unrolled(n=2, k=1, lam=1.0)  # not the training gradient: the estimator's choice


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits().split(128)[0]
    return data.x, data.y


def _estimator() -> DEQEstimator:
    torch.manual_seed(0)
    deq = small_conv_deq(
        in_channels=1,
        num_classes=10,
        channels=8,
        image_size=8,
        solver=Broyden(threshold=6, tol=1e-4),
        training_gradient=PhantomGradient(5, 0.5),
    )
    return DEQEstimator(
        deq,
        input_shape=(1, 8, 8),
        nb_classes=10,
        estimate=SELECTED,
        optimizer=torch.optim.Adam(deq.parameters(), lr=1e-2),
    )


def _clean_loss(estimator: DEQEstimator, x: np.ndarray, y: np.ndarray) -> float:
    logits = torch.from_numpy(estimator.predict(x, batch_size=len(x)))
    return float(F.cross_entropy(logits, torch.from_numpy(y)))


@pytest.fixture
def estimates_used(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every estimate whose gradient an attack computed (Unrolled's, spied on)."""
    seen: list[object] = []
    original = Unrolled.injection_gradient

    def spy(self, backward):
        seen.append(self)
        return original(self, backward)

    monkeypatch.setattr(Unrolled, "injection_gradient", spy)
    return seen


def test_madry_pgd_trainer_trains_a_deq_with_the_selected_estimate(digits, estimates_used) -> None:
    x, y = digits
    estimator = _estimator()
    before = _clean_loss(estimator, x, y)
    trainer = AdversarialTrainerMadryPGD(
        estimator, nb_epochs=3, batch_size=32, eps=0.1, eps_step=0.05, max_iter=2
    )
    trainer.fit(x, y)
    after = _clean_loss(estimator, x, y)
    print(f"Madry PGD-AT: clean loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3
    # 3 epochs x 4 batches x 2 PGD steps, each one loss_gradient with the selected estimate
    assert len(estimates_used) == 24 and all(e is SELECTED for e in estimates_used)
    assert not estimator.deq.training  # left in eval mode


def test_trades_needs_the_training_forward_and_then_trains(digits, estimates_used) -> None:
    x, y = digits
    estimator = _estimator()
    attack = ProjectedGradientDescent(
        estimator, eps=0.1, eps_step=0.05, max_iter=2, num_random_init=1, verbose=False
    )
    trades = AdversarialTrainerTRADESPyTorch(estimator, attack, beta=6.0)
    # alone: TRADES differentiates estimator._model, the defended (attack) forward, whose
    # output carries no gradient to the parameters
    with pytest.raises(RuntimeError, match="does not require grad"):
        trades.fit(x, y, nb_epochs=1, batch_size=32)
    estimates_used.clear()
    before = _clean_loss(estimator, x, y)
    with estimator.white_box.fitting():  # the module's forward is now the training forward
        trades.fit(x, y, nb_epochs=3, batch_size=32)
    after = _clean_loss(estimator, x, y)
    print(f"TRADES: clean loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3
    assert len(estimates_used) == 24 and all(e is SELECTED for e in estimates_used)
