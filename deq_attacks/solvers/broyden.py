"""Broyden's method (Eq. 7-8) with per-sample stopping and the inverse estimates it builds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deq_attacks.solvers.base import Solver, _Recorder
from deq_attacks.solvers.registry import register_solver
from deq_attacks.solvers.trajectory import BroydenInverse, Trajectory

_UPDATE_EPS = 1e-6


class _Preallocated:
    """The factors of ``B_n`` in preallocated buffers, written in place (no-grad solves).

    U is stored step-major, (B, N, d) transposed to (B, d, N), so that each step's column is
    one contiguous row; every column is written before it is read.
    """

    def __init__(self, z0: Tensor, threshold: int) -> None:
        batch, dim = z0.shape
        self.U = z0.new_empty(batch, threshold, dim).transpose(1, 2)
        self.V = z0.new_empty(batch, threshold, dim)
        self.inverse = BroydenInverse(self.U, self.V)
        self.count = 0

    def matvec(self, v: Tensor) -> Tensor:
        return self.inverse.matvec(self.count, v)

    def rmatvec(self, v: Tensor) -> Tensor:
        return self.inverse.rmatvec(self.count, v)

    def append(self, u: Tensor, v: Tensor) -> None:
        self.U[:, :, self.count] = u
        self.V[:, self.count, :] = v
        self.count += 1

    def factors(self) -> BroydenInverse:
        return BroydenInverse(self.U[:, :, : self.count], self.V[:, : self.count, :])


class _Columns:
    """The factors of ``B_n`` as lists of columns, never written in place (differentiable
    solves). ``B_n v = -v + sum_i u_i (v_i . v)``: autograd keeps references to the columns,
    not a copy of the factors per step, so memory stays O(N d) per sample."""

    def __init__(self) -> None:
        self.us: list[Tensor] = []
        self.vs: list[Tensor] = []

    @staticmethod
    def _apply(left: list[Tensor], right: list[Tensor], v: Tensor) -> Tensor:
        out = -v
        for a, b in zip(left, right):
            out = out + a * (b * v).sum(dim=-1, keepdim=True)
        return out

    def matvec(self, v: Tensor) -> Tensor:
        return self._apply(self.us, self.vs, v)

    def rmatvec(self, v: Tensor) -> Tensor:
        return self._apply(self.vs, self.us, v)

    def append(self, u: Tensor, v: Tensor) -> None:
        self.us.append(u)
        self.vs.append(v)

    def factors(self) -> BroydenInverse:
        """The recorded factors, detached (the trajectory's record, not part of the graph)."""
        if not self.us:
            raise RuntimeError("no Broyden update was made")
        return BroydenInverse(
            torch.stack(self.us, dim=2).detach(), torch.stack(self.vs, dim=1).detach()
        )


@register_solver("broyden")
@dataclass(frozen=True, repr=False)  # Solver's short repr
class Broyden(Solver):
    """Broyden's "good" method on ``g(z) = f(z) - z``.

    ``z_{n+1} = z_n - alpha B_n g(z_n)`` with ``B_0 = -I`` and the rank-one update
    ``B_{n+1} = B_n + (dz - B_n dg) / (dz^T B_n dg) dz^T B_n``. An update whose denominator is
    tiny relative to ``||dz|| ||B_n dg||``, of a sample that stopped, or whose residual change is
    at rounding level (a converged sample) is skipped and leaves a zero column, so no division
    by ~0 happens. The factors of every ``B_n`` are kept. A differentiable solve differentiates
    the updates as computed (which updates are skipped is a constant).

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
        factors = _Columns() if rec.differentiable else _Preallocated(rec.z0, self.threshold)
        z, g = rec.z, rec.fz - rec.z
        for n in range(1, self.threshold + 1):
            dz = -self.alpha * factors.matvec(g)
            z_new = z + dz
            f_new = rec.evaluate(z_new)
            took = rec.record(n, z_new, f_new)
            # the step taken: none for a sample that kept its iterate (stopped or diverged), so
            # no inf/NaN of a rejected candidate enters the update or its backward
            dz = torch.where(took.unsqueeze(-1), dz, 0.0)
            dg = rec.fz - rec.z - g
            b_dg = factors.matvec(dg)
            bt_dz = factors.rmatvec(dz)
            denom = (bt_dz * dg).sum(dim=-1)
            # the decision to update is a constant: taken on detached values
            denom_d = denom.detach()
            scale = dz.detach().norm(dim=-1) * b_dg.detach().norm(dim=-1)
            # a residual change at rounding level carries no curvature information (it would
            # corrupt B_n for a sample that has converged), so such an update is skipped too
            noise = 1e3 * torch.finfo(dg.dtype).eps * f_new.detach().norm(dim=-1)
            ok = took & torch.isfinite(denom_d) & (denom_d.abs() > _UPDATE_EPS * scale)
            ok &= (scale > 0) & (dg.detach().norm(dim=-1) > noise)
            safe = torch.where(ok, denom, torch.ones_like(denom)).unsqueeze(-1)
            keep = ok.unsqueeze(-1)
            factors.append(
                torch.where(keep, (dz - b_dg) / safe, 0.0), torch.where(keep, bt_dz, 0.0)
            )
            z, g = rec.z, rec.fz - rec.z
            if not rec.active.any():
                break
        return rec.finish(factors.factors())
