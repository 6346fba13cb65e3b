"""The attack layer's torch PGD against ART's ``ProjectedGradientDescent``: from the same random
start (ART's draw from numpy's global generator) they give the same adversaries, under L-inf
and L2, for a DEQ (its ready-made estimate) and a plain network; so PGD-AT through either
adversary trains the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescent
from torch import nn
from training_fixtures import tiny_preset

from deq_attacks import Broyden, DEQEstimator, PhantomGradient
from deq_attacks.adversarial import DefendedModel, art_random_start, pgd
from deq_attacks.data import load_digits
from deq_attacks.models import small_conv_deq
from deq_attacks.training import TrainConfig, run_training
from deq_attacks.training.adversary import Budget, make_adversary

BUDGETS = {"Linf": Budget(0.1, 0.03, 4, True, "Linf"), "L2": Budget(1.0, 0.3, 4, True, "L2")}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits().split(16)[0]
    return torch.from_numpy(data.x), torch.from_numpy(data.y).long()


def _deq() -> nn.Module:
    torch.manual_seed(0)
    return small_conv_deq(
        in_channels=1, num_classes=10, channels=8, image_size=8,
        solver=Broyden(threshold=6, tol=1e-4), training_gradient=PhantomGradient(5, 0.5),
    ).eval()  # fmt: skip


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).eval()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_torch_pgd_equals_arts_pgd_from_the_same_start(norm: str, digits) -> None:
    x, y = digits
    budget = BUDGETS[norm]
    estimator = DEQEstimator(_deq(), input_shape=(1, 8, 8), nb_classes=10, device_type="cpu")
    attack = ProjectedGradientDescent(
        estimator, norm={"Linf": np.inf, "L2": 2}[norm], eps=budget.eps,
        eps_step=budget.step, max_iter=budget.steps, num_random_init=1, batch_size=len(x),
        verbose=False,
    )  # fmt: skip
    np.random.seed(3)
    art = attack.generate(x.numpy(), np.eye(10, dtype=np.float32)[y.numpy()])
    np.random.seed(3)
    start = art_random_start(x, budget.eps, norm)
    ours = pgd(
        DefendedModel.of(estimator).loss_gradient, x, y, start, eps=budget.eps,
        step=budget.step, steps=budget.steps, norm=norm,
    ).numpy()  # fmt: skip
    moved = np.abs(art - x.numpy()).max()
    assert moved > budget.step / 2  # the attack moved the points
    np.testing.assert_allclose(ours, art, atol=1e-5, rtol=0)
    if norm == "Linf":  # ART's arithmetic, step by step: the same floats
        assert np.array_equal(ours, art)
    np.random.seed(4)  # another start: other points (the test can fail)
    other = pgd(
        DefendedModel.of(estimator).loss_gradient, x, y, art_random_start(x, budget.eps, norm),
        eps=budget.eps, step=budget.step, steps=budget.steps, norm=norm,
    ).numpy()  # fmt: skip
    assert np.abs(other - art).max() > 1e-3


@pytest.mark.parametrize("build", [_deq, _plain], ids=["deq", "plain"])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_the_torch_and_art_adversaries_make_the_same_examples(build, norm: str, digits) -> None:
    x, y = digits
    found = {}
    for kind in ("torch", "art"):
        adversary = make_adversary(
            kind, build(), BUDGETS[norm], (1, 8, 8), 10, torch.device("cpu"), len(x)
        )
        np.random.seed(0)
        found[kind] = adversary(x, y).numpy()
    assert np.abs(found["torch"] - x.numpy()).max() > 0.01
    np.testing.assert_allclose(found["torch"], found["art"], atol=1e-5, rtol=0)


def test_pgd_at_through_either_adversary_trains_the_same_run(tmp_path) -> None:
    histories = {}
    for kind in ("torch", "art"):
        config = tiny_preset("deq_large_unrolling", adversary=kind)
        result = run_training(config, tmp_path / kind, log=lambda _: None)
        histories[kind] = result.state.history
    assert "pgd-at" in histories["torch"][-1]["phase"]
    for torch_epoch, art_epoch in zip(histories["torch"], histories["art"], strict=True):
        for key in ("train_loss", "dev_clean_accuracy", "dev_pgd_accuracy", "dev_residuals"):
            assert torch_epoch[key] == art_epoch[key], key  # the same floats


def test_the_adversary_is_checked() -> None:
    with pytest.raises(ValueError, match="adversary must be torch or art, got 'foolbox'"):
        TrainConfig().updated(adversary="foolbox")
    with pytest.raises(ValueError, match="adversary must be one of torch, art"):
        make_adversary("foolbox", _plain(), BUDGETS["Linf"], (1, 8, 8), 10, torch.device("cpu"), 8)
