"""Whether a forward solve reached its fixed point, and the warning when it did not."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from deq_attacks.solvers import Trajectory

RESIDUAL_LIMIT = 0.05
"""Relative residual above which a solve did not reach its fixed point (paper Fig. 2b, 5a)."""


class NotConvergedWarning(UserWarning):
    """Some samples ended a forward solve with a relative residual above ``RESIDUAL_LIMIT``."""


def last_residuals(trajectory: Trajectory) -> Tensor:
    """Relative residual (B,) of each sample's last iterate."""
    return trajectory.residuals[:, -1]


def warn_unconverged(residuals: Tensor, stacklevel: int = 2) -> None:
    """Warn once, with their fraction, if any of the residuals (B,) exceed ``RESIDUAL_LIMIT``
    (NaN counts as above)."""
    above = ~(residuals <= RESIDUAL_LIMIT)
    count = int(above.sum())
    if count:
        total = residuals.numel()
        warnings.warn(
            f"{count} of {total} samples ({count / total:.1%}) ended the forward solve with a "
            f"relative residual above {RESIDUAL_LIMIT} (worst "
            f"{float(torch.nan_to_num(residuals, nan=float('inf')).max()):.3g}): the fixed "
            "point was not reached; raise the solver's threshold or check the model",
            NotConvergedWarning,
            stacklevel=stacklevel + 1,
        )
