"""The torch module that attacks which differentiate a model receive, and the arithmetic their
forwards and backwards run in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
from torch import Tensor, nn

from deq_attacks.interfaces import DEQEstimator

#: The arithmetic an attack can run in: float32, or bfloat16 autocast (torch.autocast).
PRECISIONS = ("fp32", "bf16")


def check_draws(draws: object) -> int:
    """``draws`` if it is an int >= 1 (a number of EOT draws), else a ValueError."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"eot_draws must be an int >= 1, got {draws!r}")
    return draws


class DefendedModel(nn.Module):
    """``estimator.model`` behind the estimator's ART preprocessing: inputs in [0, 1] to the
    defended logits (float32), differentiable through the estimator's estimate. Attacks that
    differentiate a torch module (AutoAttack, Square) receive this.

    Args:
        draws: the logits are the mean of this many forwards (each a fresh draw of a
            randomized model), so their Jacobian is the mean of the draws' Jacobians:
            expectation over transformation for an attack whose loss is linear in the logits
            (FAB's logit differences), and for the others the gradient of their loss at the
            expected logits. 1: one forward, as without it.
    """

    def __init__(self, estimator: DEQEstimator, draws: int = 1) -> None:
        super().__init__()
        self.estimator = estimator
        self.white_box = estimator.model
        self.draws = check_draws(draws)

    def forward(self, x: Tensor) -> Tensor:
        processed, _ = self.estimator._apply_preprocessing(x, y=None, fit=False, no_grad=False)
        logits = cast(Tensor, self.white_box(processed)).float()
        for _ in range(self.draws - 1):
            logits = logits + cast(Tensor, self.white_box(processed)).float()
        return logits if self.draws == 1 else logits / self.draws


@contextlib.contextmanager
def precision(device: torch.device, name: str) -> Iterator[None]:
    """Run the forwards and backwards inside in ``name`` ("fp32": as they are; "bf16":
    ``torch.autocast`` to bfloat16 on ``device``'s type)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield
