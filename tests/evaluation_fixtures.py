"""A tiny trained MLP DEQ on the digits and a tiny protocol configuration, for the
evaluation tests (fast on 2 cores); optionally batch-invariant to the bit, to test that a
sample's attack result does not depend on its batch."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import Tensor, nn

from deq_attacks import Broyden, DEQEstimator, PhantomGradient
from deq_attacks.data import load_digits
from deq_attacks.evaluation import EvaluationConfig, Mode, SweepConfig, SweepMode
from deq_attacks.models import mlp_deq

#: The tiny budgets of the attacks (their spec text).
AA = "autoattack:iterations=2,queries=5,target_classes=2"
SQUARE = "square:queries=5"
TRANSFER = "transfer:iterations=2"

TINY = EvaluationConfig(
    mode=Mode.TABLE,
    sweep_mode=SweepMode.GRID,
    eps=0.1,
    step=0.05,
    steps=2,
    attacks=f"pgd,{AA},{SQUARE}",
    long_steps=3,
    batch_size=8,
    diagnostic_samples=4,
    sweep=SweepConfig(
        {"adjoint": {"n": "1,3", "beta": "1.0"}, "unrolled": {"n": "1,3", "k": "1", "lam": "1.0"}}
    ),
)


def tiny_deq_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of a tiny MLP DEQ trained for 3 epochs on 300 digits (cached per seed)."""
    return {k: v.clone() for k, v in _trained(seed).items()}


@cache
def _trained(seed: int) -> dict[str, torch.Tensor]:
    data = load_digits()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        estimator = tiny_estimator()
        estimator.fit(data.x[:300], data.y[:300], batch_size=32, nb_epochs=3)
    return {k: v.detach().clone() for k, v in estimator.deq.state_dict().items()}


class RowLinear(nn.Module):
    """``nn.Linear`` computed row by row (a product and a sum over the last axis): a sample's
    output does not depend on the other rows of its batch, to the bit. (CPU matrix-multiply
    kernels round differently by batch size, about 1e-7: enough for an attack's path to part
    after many steps, so exact comparisons need this.)"""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        out = (x[:, None, :] * self.weight).sum(-1)
        return out if self.bias is None else out + self.bias


def tiny_estimator(trained: bool = False, batch_invariant: bool = False, **kwargs) -> DEQEstimator:
    """The tiny MLP DEQ (16 hidden units, Broyden 4 iterates, phantom training gradient), its
    weights trained if asked; ``batch_invariant`` computes its layers row by row."""
    deq = mlp_deq(
        64, 10, hidden=16, solver=Broyden(threshold=4), training_gradient=PhantomGradient(2, 0.5)
    )
    if trained:
        deq.load_state_dict(tiny_deq_weights())
    if batch_invariant:
        deq.injection.linear = RowLinear(deq.injection.linear)
        deq.f.linear = RowLinear(deq.f.linear)
        deq.head = RowLinear(deq.head)
    return DEQEstimator(
        deq,
        input_shape=(1, 8, 8),
        nb_classes=10,
        optimizer=torch.optim.Adam(deq.parameters(), 1e-2),
        **kwargs,
    )


def splits(n_dev: int = 16, n_test: int = 16) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(development, test) held-out digits."""
    data = load_digits()
    x, y = data.x[1200:], data.y[1200:]
    return (x[:n_dev], y[:n_dev]), (x[n_dev : n_dev + n_test], y[n_dev : n_dev + n_test])
