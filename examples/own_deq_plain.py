"""Evaluate your own DEQ, path 3: any module ``f(z, x)`` and a head.

The state z (B, 32) is shaped unlike the input x (B, 64), so ``state_shape`` gives z_0; the
input reaches f as is (no stem). Normalisation lives inside the model here (a fixed
``Normalize`` stem), so attacks work in [0, 1] pixel space.

    python examples/own_deq_plain.py
"""

from __future__ import annotations

import torch
from art.attacks.evasion import ProjectedGradientDescent
from torch import Tensor, nn

from deq_attacks import Broyden, DEQEstimator, Early, Exact, Final
from deq_attacks.adapters import from_f
from deq_attacks.data import load_digits


class Layer(nn.Module):
    """f(z, x) = tanh(W z + U x): z (B, 32), x (B, 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(32, 32, bias=False)
        self.u = nn.Linear(64, 32)
        with torch.no_grad():
            self.w.weight.mul_(0.5)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.w(z) + self.u(x))


class Normalize(nn.Module):
    """Fixed standardisation inside the model: attacks and clip values stay in [0, 1]."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std).flatten(1)


def main() -> None:
    torch.manual_seed(0)
    data = load_digits()
    x = data.x
    deq = from_f(
        Layer(),
        nn.Linear(32, 10),
        injection=Normalize(float(x.mean()), float(x.std())),
        state_shape=(32,),
        solver=Broyden(threshold=12),
    )
    estimator = DEQEstimator(
        deq,
        input_shape=(1, 8, 8),
        nb_classes=10,
        optimizer=torch.optim.Adam(deq.parameters(), lr=3e-3),
    )
    estimator.fit(x[:1500], data.y[:1500], batch_size=64, nb_epochs=10)
    test_x, test_y = x[1500:], data.y[1500:]
    for defense in (Final(), Early(2)):
        with estimator.using(estimate=Exact(), defense=defense):
            clean = (estimator.predict(test_x).argmax(1) == test_y).mean()
            pgd = ProjectedGradientDescent(
                estimator, eps=0.1, eps_step=0.025, max_iter=10, verbose=False
            )
            robust = (estimator.predict(pgd.generate(test_x, y=test_y)).argmax(1) == test_y).mean()
        print(f"{defense}: clean {clean:.3f}, PGD-10 (Exact, eps 0.1) {robust:.3f}")


if __name__ == "__main__":
    main()
