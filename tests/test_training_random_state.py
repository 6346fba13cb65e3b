"""Random-intermediate-state training (Yang, Li, Pang, Liu, ICML 2023): the loss of each
DEQ-mode step at z_n, n drawn uniformly from 1..threshold per step; the full solve elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deq_attacks import Broyden, PhantomGradient
from deq_attacks.models import mlp_deq
from deq_attacks.training import preset, run_training
from deq_attacks.training.build import TrainingModule
from deq_attacks.training.loop import random_solve_steps
from tests.training_fixtures import tiny_preset


def test_forward_with_solve_steps_takes_the_training_readout_at_z_n() -> None:
    torch.manual_seed(0)
    deq = mlp_deq(64, 10, hidden=8, solver=Broyden(threshold=6),
                  training_gradient=PhantomGradient(2, 0.5)).train()  # fmt: skip
    x = torch.rand(5, 1, 8, 8)
    full = deq(x)
    assert deq.last_trajectory is not None
    assert deq.last_trajectory.residuals.shape[1] == 6
    short = deq(x, solve_steps=2)
    assert deq.last_trajectory.residuals.shape[1] == 2
    # the phantom gradient's map from the solver's answer over z_1, z_2
    injection = deq.inject(x)
    z = deq.last_trajectory.final
    expected = deq.logits(deq.training_gradient.forward_state(deq, z, injection), injection)
    torch.testing.assert_close(short, expected)
    assert not torch.allclose(short, full, atol=1e-4)
    short.sum().backward()  # it trains: the parameters get a gradient from z_n
    assert all(p.grad is not None for p in deq.f.parameters())
    for bad in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match=r"solve_steps must be an int in 1\.\.6"):
            deq(x, solve_steps=bad)


def test_draws_are_uniform_over_the_threshold_and_seeded_by_the_step() -> None:
    draws = [random_solve_steps(0, step, 8) for step in range(400)]
    assert set(draws) == set(range(1, 9))
    assert draws == [random_solve_steps(0, step, 8) for step in range(400)]
    assert draws != [random_solve_steps(1, step, 8) for step in range(400)]


def test_run_training_takes_the_loss_at_the_drawn_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int | None] = []
    original = TrainingModule.forward

    def spy(self, x, unrolled=False, penalty=None, solve_steps=None):  # noqa: ANN001
        if self.training and not unrolled:
            seen.append(solve_steps)
        return original(self, x, unrolled, penalty, solve_steps)

    monkeypatch.setattr(TrainingModule, "forward", spy)
    config = tiny_preset("deq_large_unrolling", random_state=True, epochs=3, seed=5)
    run_training(config, tmp_path / "random", log=lambda _: None)
    threshold = config.model.forward_threshold
    # the DEQ-mode steps are global steps 1..5 (step 0 is the unrolled pretraining)
    assert seen == [random_solve_steps(5, step, threshold) for step in range(1, 6)]
    assert all(1 <= n <= threshold for n in seen)  # type: ignore[operator]
    seen.clear()
    run_training(tiny_preset("deq_large_unrolling", epochs=1), tmp_path / "plain",
                 log=lambda _: None)  # fmt: skip
    assert seen and all(n is None for n in seen)


def test_random_state_is_refused_for_a_network_that_is_not_a_deq() -> None:
    with pytest.raises(ValueError, match="random_state .* is DEQ-only"):
        preset("resnet18_pgd_at").updated(random_state=True)
