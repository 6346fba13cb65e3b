"""Anderson acceleration with a regularised least-squares mixing step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deq_attacks.solvers.base import Solver, _Recorder
from deq_attacks.solvers.registry import register_solver
from deq_attacks.solvers.trajectory import Trajectory


class _Window:
    """The last ``memory`` iterates ``z_i``, ``f(z_i)`` and residuals ``g_i`` in ring order.

    No-grad solves write each entry in place into (B, memory, d) buffers; differentiable
    solves keep references (autograd saved the old entries) and stack them when read.
    Iterates are kept only when the mixing needs them (``beta < 1``).
    """

    def __init__(self, rec: _Recorder, memory: int, keep_z: bool) -> None:
        self.memory, self.keep_z, self.in_place = memory, keep_z, not rec.differentiable
        self.filled = 0
        batch, dim = rec.z0.shape
        names = ("z", "fz", "g") if keep_z else ("fz", "g")
        if self.in_place:
            self.buffers = {k: rec.z0.new_empty(batch, memory, dim) for k in names}
        else:
            self.entries: dict[str, list[Tensor]] = {k: [] for k in names}

    def push(self, rec: _Recorder) -> None:
        """Store the recorder's current iterate in the next ring slot."""
        slot = self.filled % self.memory
        values = {"z": rec.z, "fz": rec.fz, "g": rec.g}
        if self.in_place:
            for name, buffer in self.buffers.items():
                buffer[:, slot] = values[name]
        else:
            for name, entries in self.entries.items():
                if slot < len(entries):
                    entries[slot] = values[name]
                else:
                    entries.append(values[name])
        self.filled += 1

    def get(self, name: str) -> Tensor:
        """(B, k, d) the stored entries, k = min(filled, memory), in slot order."""
        k = min(self.filled, self.memory)
        if self.in_place:
            return self.buffers[name][:, :k]
        return torch.stack(self.entries[name][:k], dim=1)


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
        batch = rec.z0.shape[0]
        window = _Window(rec, self.memory, keep_z=self.beta != 1)
        window.push(rec)
        for n in range(1, self.threshold + 1):
            k = min(window.filled, self.memory)
            gs = window.get("g")
            system = rec.z0.new_zeros(batch, k + 1, k + 1)
            system[:, 0, 1:] = 1
            system[:, 1:, 0] = 1
            gram = torch.bmm(gs, gs.transpose(1, 2))
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=-1).clamp(min=1e-30)
            eye = torch.eye(k, dtype=rec.z0.dtype, device=rec.z0.device)
            system[:, 1:, 1:] = gram + (self.lam * scale)[:, None, None] * eye
            rhs = rec.z0.new_zeros(batch, k + 1, 1)
            rhs[:, 0] = 1
            weights = torch.linalg.solve(system, rhs)[:, 1:, 0]
            weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
            z_new = torch.einsum("bk,bkd->bd", weights, window.get("fz"))
            if self.beta != 1:
                mix_z = torch.einsum("bk,bkd->bd", weights, window.get("z"))
                z_new = self.beta * z_new + (1 - self.beta) * mix_z
            rec.record(n, z_new, rec.evaluate(z_new))
            window.push(rec)
            if not rec.any_active:
                break
        return rec.finish()
