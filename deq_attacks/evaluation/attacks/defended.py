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


class DefendedModel(nn.Module):
    """``estimator.model`` behind the estimator's ART preprocessing: inputs in [0, 1] to the
    defended logits (float32), differentiable through the estimator's estimate. Attacks that
    differentiate a torch module (AutoAttack, Square) receive this."""

    def __init__(self, estimator: DEQEstimator) -> None:
        super().__init__()
        self.estimator = estimator
        self.white_box = estimator.model

    def forward(self, x: Tensor) -> Tensor:
        processed, _ = self.estimator._apply_preprocessing(x, y=None, fit=False, no_grad=False)
        return cast(Tensor, self.white_box(processed)).float()


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
