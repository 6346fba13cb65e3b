"""Anderson acceleration with a regularised least-squares mixing step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deq_attacks.solvers.base import Solver, _Recorder
from deq_attacks.solvers.registry import register_solver
from deq_attacks.solvers.trajectory import Trajectory


@register_solver("anderson")
@dataclass(frozen=True, repr=False)  # Solver's short repr
class Anderson(Solver):
    """Anderson acceleration (type II) over the last ``memory`` iterates.

    The mixing weights ``a`` (summing to 1) minimise ``||G^T a||^2 + lam s ||a||^2`` where the rows
    of ``G`` are the residuals ``f(z_i) - z_i`` in memory and ``s`` is the mean of their squared
    norms (so the regularisation keeps its strength as residuals shrink); they come from one batched
    ``torch.linalg.solve`` of the bordered system, one independent system per sample. The next
    iterate is ``beta * sum a_i f(z_i) + (1 - beta) * sum a_i z_i``. A differentiable solve
    differentiates the mixing weights through the solve.

    Args:
        memory: number of past iterates mixed, at least 1.
        lam: Tikhonov regularisation relative to the mean squared residual, > 0.
        beta: mixing, in (0, 1].
    """

    memory: int = 5
    lam: float = 1e-4
    beta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be an int >= 1, got {self.memory!r}")
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0, got {self.lam!r}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {self.beta!r}")

    def _solve(self, rec: _Recorder) -> Trajectory:
        batch, dim = rec.z0.shape
        xs = rec.z0.new_zeros(batch, self.memory, dim)
        fs = rec.z0.new_zeros(batch, self.memory, dim)
        xs[:, 0], fs[:, 0] = rec.z, rec.fz
        filled = 1
        for n in range(1, self.threshold + 1):
            k = min(filled, self.memory)
            gs = fs[:, :k] - xs[:, :k]
            system = rec.z0.new_zeros(batch, k + 1, k + 1)
            system[:, 0, 1:] = 1
            system[:, 1:, 0] = 1
            eye = torch.eye(k, dtype=rec.z0.dtype, device=rec.z0.device)
            gram = torch.bmm(gs, gs.transpose(1, 2))
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=-1).clamp(min=1e-30)
            system[:, 1:, 1:] = gram + (self.lam * scale)[:, None, None] * eye
            rhs = rec.z0.new_zeros(batch, k + 1, 1)
            rhs[:, 0] = 1
            weights = torch.linalg.solve(system, rhs)[:, 1:, 0]
            weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
            mix_f = torch.einsum("bk,bkd->bd", weights, fs[:, :k])
            mix_x = torch.einsum("bk,bkd->bd", weights, xs[:, :k])
            z_new = self.beta * mix_f + (1 - self.beta) * mix_x
            rec.record(n, z_new, rec.evaluate(z_new))
            slot = filled % self.memory
            if rec.differentiable:  # the old window is saved for the backward: write a copy
                xs, fs = xs.clone(), fs.clone()
            xs[:, slot], fs[:, slot] = rec.z, rec.fz
            filled += 1
            if not rec.active.any():
                break
        return rec.finish()
