"""Variational dropout: one mask per forward solve, shared by every iteration of f."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VariationalDropout(nn.Module):
    """Dropout whose mask is fixed between calls to `reset_mask()`.

    The mask has shape (B, C) for 2-D input and (B, C, 1, ..., 1) for input of shape
    (B, C, *spatial): one keep/drop decision per sample and channel, scaled by 1 / (1 - p).
    It is sampled on the first forward in training mode after `reset_mask()` and reused by
    every later call, so f_theta stays one fixed function during a fixed-point solve.
    In eval mode, or with p == 0, the module is the identity.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must satisfy 0 <= p < 1, got {p}")
        self.p = float(p)
        self.mask: Tensor | None = None

    def reset_mask(self) -> None:
        """Forget the current mask; the next training-mode forward samples a new one."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        """Apply the current mask to x of shape (B, C, *spatial); returns the same shape."""
        if not self.training or self.p == 0.0:
            return x
        if x.dim() < 2:
            raise ValueError(f"expected input of shape (B, C, ...), got shape {tuple(x.shape)}")
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        if self.mask is None:
            keep = torch.full(shape, 1.0 - self.p, dtype=x.dtype, device=x.device)
            self.mask = torch.bernoulli(keep) / (1.0 - self.p)
        elif tuple(self.mask.shape) != shape:
            raise ValueError(
                f"dropout mask of shape {tuple(self.mask.shape)} does not fit input of shape "
                f"{tuple(x.shape)} (batch size or channels changed); call reset_mask() first"
            )
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def reset_variational_dropout(f: nn.Module) -> None:
    """Reset hook: forget the mask of every ``VariationalDropout`` in ``f``."""
    for module in f.modules():
        if isinstance(module, VariationalDropout):
            module.reset_mask()
