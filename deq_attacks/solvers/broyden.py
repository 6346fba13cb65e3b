"""Broyden's method (Eq. 7-8) with per-sample stopping and the inverse estimates it builds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deq_attacks.solvers.base import Solver, _Recorder
from deq_attacks.solvers.trajectory import BroydenInverse, Trajectory

_UPDATE_EPS = 1e-6


@dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's "good" method on ``g(z) = f(z) - z``.

    ``z_{n+1} = z_n - alpha B_n g(z_n)`` with ``B_0 = -I`` and the rank-one update
    ``B_{n+1} = B_n + (dz - B_n dg) / (dz^T B_n dg) dz^T B_n``. An update whose denominator is
    tiny relative to ``||dz|| ||B_n dg||``, of a sample that stopped, or whose residual change is
    at rounding level (a converged sample) is skipped and leaves a zero column, so no division
    by ~0 happens. The factors of every ``B_n`` are kept.

    Args:
        alpha: step size, > 0.
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")

    @property
    def keeps_inverse(self) -> bool:
        return True

    def _solve(self, rec: _Recorder) -> Trajectory:
        batch, dim = rec.z0.shape
        # U is stored step-major, (B, N, d) transposed to (B, d, N), so that each step's column
        # is one contiguous row; every column is written before it is read
        U = rec.z0.new_empty(batch, self.threshold, dim).transpose(1, 2)
        V = rec.z0.new_empty(batch, self.threshold, dim)
        inverse = BroydenInverse(U, V)
        z, g = rec.z, rec.fz - rec.z
        for n in range(1, self.threshold + 1):
            dz = -self.alpha * inverse.matvec(n - 1, g)
            z_new = z + dz
            f_new = rec.evaluate(z_new)
            g_new = f_new - z_new
            took = rec.record(n, z_new, f_new)
            dg = g_new - g
            b_dg = inverse.matvec(n - 1, dg)
            bt_dz = inverse.rmatvec(n - 1, dz)
            denom = (bt_dz * dg).sum(dim=-1)
            scale = dz.norm(dim=-1) * b_dg.norm(dim=-1)
            # a residual change at rounding level carries no curvature information (it would
            # corrupt B_n for a sample that has converged), so such an update is skipped too
            noise = 1e3 * torch.finfo(dg.dtype).eps * f_new.norm(dim=-1)
            ok = took & torch.isfinite(denom) & (denom.abs() > _UPDATE_EPS * scale) & (scale > 0)
            ok &= dg.norm(dim=-1) > noise
            safe = torch.where(ok, denom, torch.ones_like(denom)).unsqueeze(-1)
            keep = ok.unsqueeze(-1)
            U[:, :, n - 1] = torch.where(keep, (dz - b_dg) / safe, 0.0)
            V[:, n - 1, :] = torch.where(keep, bt_dz, 0.0)
            z, g = rec.z, rec.fz - rec.z
            if not rec.active.any():
                break
        steps_run = len(rec._rel_hist)
        return rec.finish(BroydenInverse(U[:, :, :steps_run], V[:, :steps_run, :]))
