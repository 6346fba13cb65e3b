"""A fully connected DEQ: z* = tanh(W z* + U x + b), logits = V z* + c.

Parts for `DEQ`:

- injection: x (B, *input_shape) -> inj (B, hidden): flatten, then Linear (U, b);
- f: (z (B, hidden), inj (B, hidden)) -> tanh(W z + inj), with W initialised as an orthogonal
  matrix times INIT_GAIN < 1, so that f is a contraction at init (tanh is 1-Lipschitz);
- head: z (B, hidden) -> logits (B, num_classes), Linear (V, c).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from deq_attacks.models.registry import register_model

if TYPE_CHECKING:
    from deq_attacks.deq.model import DEQ

INIT_GAIN = 0.7


class MLPInjection(nn.Module):
    """x (B, *input_shape) with prod(input_shape) = in_features -> inj (B, hidden)."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class MLPLayer(nn.Module):
    """f_theta: (z (B, hidden), inj (B, hidden)) -> tanh(W z + inj) of shape (B, hidden)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.linear.weight, gain=INIT_GAIN)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(self.linear(z) + inj)


def mlp_deq_parts(
    in_features: int, hidden: int, num_classes: int
) -> tuple[MLPInjection, MLPLayer, nn.Linear]:
    """Build (injection, f, head) of the MLP DEQ; in_features = C * H * W for image input."""
    if in_features <= 0 or hidden <= 0 or num_classes <= 0:
        raise ValueError("in_features, hidden and num_classes must be positive")
    return MLPInjection(in_features, hidden), MLPLayer(hidden), nn.Linear(hidden, num_classes)


@register_model
def mlp_deq(in_features: int, num_classes: int, hidden: int = 64, **deq_kwargs: Any) -> DEQ:
    """The MLP DEQ as a `DEQ`; deq_kwargs go to `DEQ` (solver and gradient settings)."""
    from deq_attacks.deq.model import DEQ

    injection, f, head = mlp_deq_parts(in_features, hidden, num_classes)
    return DEQ(f=f, injection=injection, head=head, **deq_kwargs)
