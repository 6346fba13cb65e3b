"""Evaluate your own DEQ, path 1: a model built with torchdeq.

A torchdeq user's model has an encoder, a layer ``f(z, x)`` (here with torchdeq's weight norm
and variational dropout) and a head, run by a torchdeq core. ``from_torchdeq`` keeps the three
parts, maps the core's solver and gradient settings to ours and resets torchdeq's norms and
dropout masks before each solve. The example trains it a few steps on the 8x8 digits, checks
the Exact gradient against finite differences (in float64), and attacks it with ART's PGD.

    pip install -e ".[torchdeq]"
    python examples/own_deq_torchdeq.py
"""

from __future__ import annotations

import numpy as np
import torch
import torchdeq
from art.attacks.evasion import ProjectedGradientDescent
from torch import Tensor, nn
from torchdeq.dropout import VariationalDropout2d
from torchdeq.norm import apply_norm

from deq_attacks import Broyden, DEQEstimator, Exact, Unrolled
from deq_attacks.adapters.torchdeq import from_torchdeq
from deq_attacks.data import load_digits

CHANNELS = 8


class Layer(nn.Module):
    """f(z, x) = tanh(drop(conv(z)) + x) on (B, C, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.drop = VariationalDropout2d(0.1, token_first=False)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.drop(self.conv(z)) + x)


def main() -> None:
    torch.manual_seed(0)
    layer = Layer()
    apply_norm(layer, "weight_norm")  # torchdeq's weight norm: recomputed by reset_norm
    with torch.no_grad():
        layer.conv.weight_g.mul_(0.4)  # start contractive
    encoder = nn.Conv2d(1, CHANNELS, 3, padding=1)
    head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 64, 10))
    core = torchdeq.get_deq(
        f_solver="anderson",
        f_max_iter=30,
        f_tol=1e-5,
        f_stop_mode="abs",
        ift=True,
        b_solver="broyden",
        b_max_iter=30,
        b_tol=1e-6,
    )
    # shares layer, encoder and head; refuses inputs of any other sample shape
    deq = from_torchdeq(layer, encoder, head, core, input_shape=(1, 8, 8))
    print("solver:", deq.solver)
    print("training gradient:", deq.training_gradient)

    data = load_digits()
    test = slice(1500, 1600)
    estimator = DEQEstimator(
        deq,
        input_shape=(1, 8, 8),
        nb_classes=10,
        optimizer=torch.optim.Adam(deq.parameters(), lr=1e-2),
    )
    before = (estimator.predict(data.x[test]).argmax(1) == data.y[test]).mean()
    estimator.fit(data.x[:1500], data.y[:1500], batch_size=100, nb_epochs=3)
    after = (estimator.predict(data.x[test]).argmax(1) == data.y[test]).mean()
    print(f"clean accuracy on 100 held-out digits: {before:.2f} before, {after:.2f} after training")

    for estimate in (Exact(), Unrolled(n=1)):
        with estimator.using(estimate=estimate):
            pgd = ProjectedGradientDescent(
                estimator, eps=0.1, eps_step=0.025, max_iter=10, verbose=False
            )
            x_adv = pgd.generate(data.x[test], y=data.y[test])
        robust = (estimator.predict(x_adv).argmax(1) == data.y[test]).mean()
        print(f"PGD-10 (eps 0.1) with {estimate.__class__.__name__}: accuracy {robust:.2f}")

    # Exact against finite differences, in float64 with a tight solver (same parts)
    tight = from_torchdeq(layer, encoder, head, core, solver=Broyden(threshold=60, tol=1e-13))
    tight.double()
    check = DEQEstimator(
        tight, input_shape=(1, 8, 8), nb_classes=10, estimate=Exact(Broyden(60, tol=1e-13))
    )
    xb = torch.from_numpy(data.x[1500:1504].astype(np.float64))
    yb = torch.from_numpy(data.y[1500:1504])
    grad = check.loss_gradient(xb, yb)

    def loss(inputs: Tensor) -> float:
        with torch.no_grad():
            logits, _ = check.white_box.defended(inputs)
        return float(nn.functional.cross_entropy(logits, yb))

    h = 1e-5
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(xb.shape, generator=gen, dtype=torch.float64)
        fd = (loss(xb + h * v) - loss(xb - h * v)) / (2 * h)
        exact = float((grad * v).sum())
        print(
            f"direction {seed}: Exact {exact:+.9f}, central difference {fd:+.9f}, "
            f"relative error {abs(exact - fd) / abs(fd):.1e}"
        )


if __name__ == "__main__":
    main()
