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
    """No-grad solves: the factors of ``B_n`` in the recorder's workspace and the step's
    temporaries in one more buffer, all written in place (no memory is allocated per step).

    U and V are stored step-major, (N, B, d), so that each step's column pair is two
    contiguous (B, d) blocks; the batched products read (B, n, d) views of them, and U is
    exposed as (B, d, N). Every column is written before it is read.
    """

    def __init__(self, workspace: Tensor) -> None:
        self._U, self._V = workspace.chunk(2)
        self._work = dict(
            zip(("p", "q", "dg", "tmp"), workspace.new_empty(4, *workspace.shape[1:]))
        )
        self.count = 0

    def buffer(self, name: str) -> Tensor | None:
        """The step's scratch (B, d) for ``name`` ("p", "q", "dg", "tmp")."""
        return self._work[name]

    def columns(self) -> tuple[Tensor | None, Tensor | None]:
        """Where the next update's column pair (u, v) is written."""
        return self._U[self.count], self._V[self.count]

    def products(self, g: Tensor, p: Tensor, v_out: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(B_n g, B_n^T p)`` for (B, d) vectors, n the updates so far; ``B_n^T p`` is written
        into ``v_out`` (it becomes the next column of V)."""
        q_out = self._work["q"]
        assert v_out is not None
        n = self.count
        if n == 0:
            return torch.neg(g, out=q_out), torch.neg(p, out=v_out)
        U, V = self._U[:n].transpose(0, 1), self._V[:n].transpose(0, 1)  # (B, n, d)
        g_row, p_row = g.unsqueeze(1), p.unsqueeze(1)  # row-vector products beat bmm on columns
        torch.baddbmm(g_row, torch.bmm(g_row, V.transpose(1, 2)), U, beta=-1, out=q_out[:, None])
        torch.baddbmm(p_row, torch.bmm(p_row, U.transpose(1, 2)), V, beta=-1, out=v_out[:, None])
        return q_out, v_out

    def commit(self, u: Tensor, v: Tensor, skipped: Tensor | None) -> tuple[Tensor, Tensor]:
        """Keep the column pair written by ``columns``; rows in ``skipped`` (indices) become
        zero. Returns the pair as stored."""
        if skipped is not None:
            u.index_fill_(0, skipped, 0.0)
            v.index_fill_(0, skipped, 0.0)
        self.count += 1
        return u, v

    def factors(self) -> BroydenInverse:
        n = self.count
        return BroydenInverse(self._U[:n].permute(1, 2, 0), self._V[:n].transpose(0, 1))


class _Columns:
    """Differentiable solves: the factors of ``B_n`` as lists of columns, never written in
    place. ``B_n v = -v + sum_i u_i (v_i . v)``: autograd keeps references to the columns, not
    a copy of the factors per step, so memory stays O(N d) per sample."""

    def __init__(self) -> None:
        self.us: list[Tensor] = []
        self.vs: list[Tensor] = []

    def buffer(self, name: str) -> None:
        """No scratch: every result is a new tensor (autograd may save it)."""
        return None

    def columns(self) -> tuple[None, None]:
        return None, None

    def products(self, g: Tensor, p: Tensor, v_out: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(B_n g, B_n^T p)`` for (B, d) vectors."""
        bg, btp = -g, -p
        for u, v in zip(self.us, self.vs):
            bg = bg + u * (v * g).sum(dim=-1, keepdim=True)
            btp = btp + v * (u * p).sum(dim=-1, keepdim=True)
        return bg, btp

    def commit(self, u: Tensor, v: Tensor, skipped: Tensor | None) -> tuple[Tensor, Tensor]:
        if skipped is not None:
            keep = torch.ones(u.shape[0], 1, dtype=torch.bool, device=u.device)
            keep[skipped] = False
            u, v = torch.where(keep, u, 0.0), torch.where(keep, v, 0.0)
        self.us.append(u)
        self.vs.append(v)
        return u, v

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

    Each step costs one product with ``B_n`` and one with ``B_n^T``: with ``p = B_n g_n`` (so
    ``dz = -alpha p``), ``q = B_n g_{n+1}`` gives ``B_n dg = q - p`` and, after the update,
    ``B_{n+1} g_{n+1} = q + u (v . g_{n+1})``; ``w = B_n^T p`` gives ``dz^T B_n = -alpha w^T``.
    The update is stored as the column pair ``u = -(q + (alpha - 1) p) / (w . dg)``, ``v = w``.

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

    @property
    def workspace_rows(self) -> int:
        return 2 * self.threshold  # U and V

    def _solve(self, rec: _Recorder) -> Trajectory:
        alpha = self.alpha
        store = _Columns() if rec.workspace is None else _Preallocated(rec.workspace)
        z, g = rec.z, rec.g
        p = torch.neg(g, out=store.buffer("p"))  # B_0 g_0
        p_norm = p.detach().norm(dim=-1)
        eps = torch.finfo(g.dtype).eps
        for n in range(1, self.threshold + 1):
            z_new = torch.add(z, p, alpha=-alpha)  # z_n + dz, dz = -alpha B_n g_n
            rec.record(n, z_new, rec.evaluate(z_new))
            g_new = rec.g
            u_out, v_out = store.columns()
            q, w = store.products(g_new, p, v_out)  # B_n g_{n+1}, B_n^T p
            # a sample that kept its iterate (stopped or diverged) has dg = 0 exactly, so its
            # update is skipped (||dg|| > noise fails) and no inf/NaN of a rejected candidate
            # enters it or its backward
            dg = torch.sub(g_new, g, out=store.buffer("dg"))
            wdg = torch.mul(w, dg, out=store.buffer("tmp")).sum(dim=-1)
            b_dg = torch.sub(q, p, out=store.buffer("tmp"))  # B_n dg
            # the decision to update is a constant: taken on detached values, per sample
            denom = -alpha * wdg.detach()  # dz^T B_n dg
            scale = (alpha * p_norm) * b_dg.detach().norm(dim=-1)  # ||dz|| ||B_n dg||
            # a residual change at rounding level carries no curvature information (it would
            # corrupt B_n for a sample that has converged), so such an update is skipped too
            noise = 1e3 * eps * rec.fz_norm
            ok = torch.isfinite(denom) & (denom.abs() > _UPDATE_EPS * scale) & (scale > 0)
            ok &= dg.detach().norm(dim=-1) > noise
            all_ok = bool(ok.all())
            skipped = None if all_ok else (~ok).nonzero().squeeze(1)
            safe = wdg if all_ok else torch.where(ok, wdg, torch.ones_like(wdg))
            pre = q if alpha == 1 else torch.add(q, p, alpha=alpha - 1, out=store.buffer("tmp"))
            u = torch.div(pre, (-safe).unsqueeze(-1), out=u_out)
            u, v = store.commit(u, w, skipped)
            coeff = torch.mul(v, g_new, out=store.buffer("tmp")).sum(dim=-1, keepdim=True)
            p = torch.addcmul(q, u, coeff, out=store.buffer("p"))  # B_{n+1} g_{n+1}
            p_norm = p.detach().norm(dim=-1)
            z, g = rec.z, g_new
            if not rec.any_active:
                break
        return rec.finish(store.factors())
