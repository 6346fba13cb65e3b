"""Anderson acceleration with a regularised least-squares mixing step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deq_attacks.solvers.base import Solver, _Recorder
from deq_attacks.solvers.registry import register_solver
from deq_attacks.solvers.trajectory import Trajectory


class _Window:
    """The last ``memory`` iterates ``z_i``, ``f(z_i)``, residuals ``g_i`` in ring order, and
    the Gram matrix ``g_i . g_j`` of the residuals.

    Each push computes only the new residual's row of the Gram matrix (k dot products per
    sample) instead of the whole matrix. No-grad solves write each entry in place into
    (B, memory, d) buffers, allocated at once; differentiable solves keep references
    (autograd saved the old entries), stack them when read and update the Gram matrix out of
    place. Iterates are kept only when the mixing needs them (``beta < 1``).
    """

    def __init__(self, rec: _Recorder, memory: int, keep_z: bool) -> None:
        self.memory, self.in_place = memory, not rec.differentiable
        self.filled = 0
        batch, dim = rec.z0.shape
        names = ("z", "fz", "g") if keep_z else ("fz", "g")
        if self.in_place:
            window = rec.z0.new_empty(len(names), batch, memory, dim)
            self.buffers = dict(zip(names, window.unbind(0)))
        else:
            self.entries: dict[str, list[Tensor]] = {k: [] for k in names}
        self.gram = rec.z0.new_zeros(batch, memory, memory)

    @property
    def size(self) -> int:
        """k, the number of entries held (at most ``memory``)."""
        return min(self.filled, self.memory)

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
        row = torch.bmm(rec.g.unsqueeze(1), self.get("g").transpose(1, 2)).squeeze(1)  # (B, k)
        gram = self.gram if self.in_place else self.gram.clone()
        k = self.size
        gram[:, slot, :k] = row
        gram[:, :k, slot] = row
        self.gram = gram

    def get(self, name: str) -> Tensor:
        """(B, k, d) the stored entries in slot order."""
        if self.in_place:
            return self.buffers[name][:, : self.size]
        return torch.stack(self.entries[name][: self.size], dim=1)


@register_solver("anderson")
@dataclass(frozen=True, repr=False)  # Solver's short repr
class Anderson(Solver):
    """Anderson acceleration (type II) over the last ``memory`` iterates.

    The mixing weights ``a`` (summing to 1) minimise ``||G^T a||^2 + lam s ||a||^2`` where the rows
    of ``G`` are the residuals ``f(z_i) - z_i`` in memory and ``s`` is the mean of their squared
    norms (so the regularisation keeps its strength as residuals shrink); they come from one batched
    ``torch.linalg.solve`` of the bordered system, one independent system per sample; each step
    adds one row of ``G G^T``. The next iterate is ``beta * sum a_i f(z_i) + (1 - beta) *
    sum a_i z_i``. A differentiable solve differentiates the mixing weights through the solve.

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
        # the bordered system [[0, 1^T], [1, G G^T + lam s I]] [mu; a] = [1; 0]
        border = rec.z0.new_ones(batch, self.memory + 1, self.memory + 1)
        border[:, 0, 0] = 0
        rhs = rec.z0.new_zeros(batch, self.memory + 1, 1)
        rhs[:, 0] = 1
        for n in range(1, self.threshold + 1):
            k = window.size
            gram = window.gram[:, :k, :k]
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=-1).clamp(min=1e-30)
            system = border[:, : k + 1, : k + 1].clone()
            system[:, 1:, 1:] = gram
            system[:, 1:, 1:].diagonal(dim1=1, dim2=2).add_((self.lam * scale)[:, None])
            weights = torch.linalg.solve(system, rhs[:, : k + 1])[:, 1:]  # (B, k, 1)
            weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0).transpose(1, 2)
            z_new = torch.bmm(weights, window.get("fz")).squeeze(1)
            if self.beta != 1:
                mix_z = torch.bmm(weights, window.get("z")).squeeze(1)
                z_new = self.beta * z_new + (1 - self.beta) * mix_z
            rec.record(n, z_new, rec.evaluate(z_new))
            window.push(rec)
            if not rec.any_active:
                break
        return rec.finish()
