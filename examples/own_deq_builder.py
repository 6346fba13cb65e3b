"""Evaluate your own DEQ from the command line: a builder module for ``deq-attacks evaluate``.

A torchdeq user's model (their own names: ``encoder``, ``layer``, ``head``, a core with
Anderson) and the two builders the command line can call:

- ``build(checkpoint=None, **deq_kwargs)`` loads the checkpoint into the user's own module,
  then adapts it (``from_torchdeq``); ``**deq_kwargs`` lets ``--model.forward_solver`` and
  ``--model.training_gradient`` through to the DEQ;
- ``build_adapted(**deq_kwargs)`` takes no checkpoint: the command line loads it into the
  adapted DEQ, renaming the keys with ``--model.key_map``.

Running this file trains the model for a few epochs on the first 1,200 embedded digits (about
half a minute on one CPU thread) and writes ``runs/own_deq/own_deq.pt`` (a plain
``torch.save`` of the training checkpoint, ``{"epoch": ..., "state_dict": ...}``), then
prints the commands::

    cd examples
    python own_deq_builder.py
    deq-attacks evaluate --model.name own_deq_builder:build \\
        --model.checkpoint runs/own_deq/own_deq.pt --data digits --preset digits \\
        --out_dir runs/own_deq
    deq-attacks evaluate --model.name own_deq_builder:build_adapted \\
        --model.checkpoint runs/own_deq/own_deq.pt --model.key_map+ encoder.=injection. \\
        --model.key_map+ layer.=f. \\
        --data digits --preset digits --out_dir runs/own_deq_adapted

``deq-attacks`` imports ``own_deq_builder`` from the working directory, as ``python -m``
would.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchdeq
from torch import Tensor, nn
from torchdeq.norm import apply_norm

from deq_attacks import DEQ
from deq_attacks.adapters.torchdeq import from_torchdeq
from deq_attacks.checkpoints import load_weights

CHANNELS = 8
INPUT_SHAPE = (1, 8, 8)


class Layer(nn.Module):
    """f(z, x) = tanh(conv(z) + x) on (B, C, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(z) + x)


class DigitsDEQ(nn.Module):
    """The user's torchdeq model, trained the torchdeq way (``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.layer = Layer()
        apply_norm(self.layer, "weight_norm")
        with torch.no_grad():
            self.layer.conv.weight_g.mul_(0.4)  # start contractive
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 64, 10))
        self.deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=20, f_tol=1e-4, grad=5)

    def forward(self, x: Tensor) -> Tensor:
        torchdeq.norm.reset_norm(self.layer)
        inj = self.encoder(x)
        z, _ = self.deq(lambda z: self.layer(z, inj), torch.zeros_like(inj))
        return self.head(z[-1])


def build(checkpoint: str | Path | None = None, **deq_kwargs: object) -> DEQ:
    """The user's model with ``checkpoint`` loaded into it, adapted for deq-attacks."""
    net = DigitsDEQ()
    if checkpoint is not None:
        print(load_weights(net, checkpoint).describe())
    return from_torchdeq(
        net.layer, net.encoder, net.head, net.deq, input_shape=INPUT_SHAPE, **deq_kwargs
    )


def build_adapted(**deq_kwargs: object) -> DEQ:
    """The same model, untrained: ``--model.checkpoint`` with ``--model.key_map`` loads the
    weights."""
    return build(None, **deq_kwargs)


def main() -> None:
    from deq_attacks.data import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x, y = torch.from_numpy(data.x[:1200]), torch.from_numpy(data.y[:1200])
    net = DigitsDEQ()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(4):
        for batch in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.3f}")
    path = Path("runs/own_deq/own_deq.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 4, "state_dict": net.state_dict()}, path)
    with torch.no_grad():
        held_out = (net(torch.from_numpy(data.x[1200:])).argmax(1).numpy() == data.y[1200:]).mean()
    print(f"clean accuracy on the 597 held-out digits: {held_out:.3f}; wrote {path}")
    print(
        "now, from the folder of own_deq_builder.py:\n"
        f"  deq-attacks evaluate --model.name own_deq_builder:build --model.checkpoint {path} "
        "--data digits --preset digits --out_dir runs/own_deq\n"
        "  deq-attacks evaluate --model.name own_deq_builder:build_adapted "
        f"--model.checkpoint {path} --model.key_map+ encoder.=injection. "
        "--model.key_map+ layer.=f. --data digits --preset digits "
        "--out_dir runs/own_deq_adapted"
    )


if __name__ == "__main__":
    main()
