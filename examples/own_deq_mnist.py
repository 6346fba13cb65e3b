"""A user's own torchdeq DEQ on MNIST (Anderson solver), trained on images 0-7,999 and then
evaluated by ``deq-attacks evaluate`` on images 8,000-8,199 (development split 9,800-9,999).

This file is what such a user has: their model (their own names, torchdeq's core with
``f_solver="anderson"`` and the phantom gradient, torchdeq's weight norm), their training
loop, and one builder for the command line, ``build(checkpoint=None, **deq_kwargs)``, which
loads their checkpoint into their own module and adapts it (``from_torchdeq``). The data is an
arrays file of the MNIST test set (``x`` uint8 (10000, 1, 28, 28), ``y``), e.g.
``../shared/data/mnist_t10k.npz`` beside the repository::

    cd examples
    python own_deq_mnist.py ../../shared/data/mnist_t10k.npz      # trains on images 0-7,999
    deq-attacks evaluate --model.name own_deq_mnist:build \\
        --model.checkpoint runs/own_deq_mnist/mnist_deq.pt \\
        --data ../../shared/data/mnist_t10k.npz --preset mnist --dev-range 9800:10000 \\
        --test-range 8000:8200 --mode cascade --out-dir runs/own_deq_mnist/eval
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchdeq
from torch import Tensor, nn
from torchdeq.norm import apply_norm, reset_norm

from deq_attacks import DEQ
from deq_attacks.adapters.torchdeq import from_torchdeq
from deq_attacks.checkpoints import load_weights
from deq_attacks.data import load_arrays_file

CHANNELS = 16
INPUT_SHAPE = (1, 28, 28)
CHECKPOINT = Path("runs/own_deq_mnist/mnist_deq.pt")
TRAIN_IMAGES = 8000


class Layer(nn.Module):
    """f(z, x) = GroupNorm(relu(conv2(relu(conv1(z))) + x)) on (B, 16, 14, 14)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.norm = nn.GroupNorm(4, CHANNELS)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.norm(torch.relu(self.conv2(torch.relu(self.conv1(z))) + x))


class MnistDEQ(nn.Module):
    """The user's model, trained the torchdeq way (``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, CHANNELS, 3, stride=2, padding=1), nn.ReLU())
        self.layer = Layer()
        apply_norm(self.layer, "weight_norm")
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(CHANNELS * 49, 10)
        )
        self.deq = torchdeq.get_deq(
            f_solver="anderson", f_max_iter=12, f_tol=1e-3, grad=5, tau=0.5
        )

    def forward(self, x: Tensor) -> Tensor:
        reset_norm(self.layer)
        injection = self.encoder(x)
        z, _ = self.deq(lambda z: self.layer(z, injection), torch.zeros_like(injection))
        return self.head(z[-1])


def build(checkpoint: str | Path | None = None, **deq_kwargs: object) -> DEQ:
    """The user's model with ``checkpoint`` loaded into it, adapted for deq-attacks (the
    command line passes ``--checkpoint`` here because the signature names it)."""
    net = MnistDEQ()
    if checkpoint is not None:
        print(load_weights(net, checkpoint).describe())
    return from_torchdeq(
        net.layer, net.encoder, net.head, net.deq, input_shape=INPUT_SHAPE, **deq_kwargs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="train the user's torchdeq MNIST DEQ")
    parser.add_argument("data", type=Path, help="the MNIST arrays file (x, y)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_arrays_file(args.data)
    x, y = torch.from_numpy(data.x[:TRAIN_IMAGES]), torch.from_numpy(data.y[:TRAIN_IMAGES])
    net = MnistDEQ()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(x)).split(100):
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.3f} "
              f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": args.epochs, "state_dict": net.state_dict()}, args.out)
    net.eval()
    with torch.no_grad():
        test = torch.from_numpy(data.x[TRAIN_IMAGES:])
        accuracy = (net(test).argmax(1).numpy() == data.y[TRAIN_IMAGES:]).mean()
    print(f"clean accuracy on images {TRAIN_IMAGES}..{len(data) - 1}: {accuracy:.3f}; "
          f"wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
