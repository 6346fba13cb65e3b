"""The record of one batched fixed-point solve: what the solver would otherwise hide."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class BroydenInverse:
    """Low-rank factors of Broyden's inverse-Jacobian estimates.

    ``B_n = -I + U[:, :, :n] @ V[:, :n, :]`` approximates ``(J_f(z_n) - I)^{-1}``, the inverse
    Jacobian of the residual ``g(z) = f(z) - z``. Broyden only appends columns, so every
    ``B_n`` (n = 0..N-1) is a prefix of the final factors. A column is zero where that sample's
    update was skipped (converged, frozen, diverged or an ill-conditioned update).

    Shapes: ``U`` (B, d, N), ``V`` (B, N, d).
    """

    U: Tensor
    V: Tensor

    @property
    def num_updates(self) -> int:
        return self.U.shape[-1]

    def _check(self, n: int) -> None:
        if not 0 <= n <= self.num_updates:
            raise IndexError(f"B_{n} is not recorded: the solver made {self.num_updates} updates")

    def matvec(self, n: int, v: Tensor) -> Tensor:
        """``B_n v`` for v of shape (B, d)."""
        self._check(n)
        if n == 0:
            return -v
        row = v.unsqueeze(1)  # (B, 1, d): row-vector products are far faster than bmm on columns
        coeff = torch.bmm(row, self.V[:, :n, :].transpose(1, 2))  # (B, 1, n)
        return torch.baddbmm(row, coeff, self.U[:, :, :n].transpose(1, 2), beta=-1).squeeze(1)

    def rmatvec(self, n: int, v: Tensor) -> Tensor:
        """``B_n^T v`` for v of shape (B, d)."""
        self._check(n)
        if n == 0:
            return -v
        row = v.unsqueeze(1)
        coeff = torch.bmm(row, self.U[:, :, :n])  # (B, 1, n)
        return torch.baddbmm(row, coeff, self.V[:, :n, :], beta=-1).squeeze(1)

    def dense(self, n: int) -> Tensor:
        """The dense matrices ``B_n`` (B, d, d); for tests and small problems only."""
        self._check(n)
        eye = torch.eye(self.U.shape[1], dtype=self.U.dtype, device=self.U.device)
        return -eye + torch.bmm(self.U[:, :, :n], self.V[:, :n, :])


@dataclass
class Trajectory:
    """One batched solve of ``z = f(z)`` over flat states of shape (B, d).

    Iterates are numbered ``z_1..z_N`` in solver order (``z_0`` is the initial state). A sample
    that stops (converged or diverged) at step ``N_i`` is frozen: ``z_n = z_{N_i}`` for
    ``n > N_i``, so no sample's record depends on the others in its batch.

    Attributes:
        z0: (B, d) initial state.
        final: (B, d) the solver's answer per sample: the lowest-residual iterate, or the last
            one when the solver was asked not to pick the best.
        residuals: (B, N) relative residual ``||f(z_n) - z_n|| / ||f(z_n)||`` of each iterate.
        abs_residuals: (B, N) absolute residual ``||f(z_n) - z_n||``.
        steps: (B,) number of iterates each sample actually produced (``N_i``).
        converged: (B,) residual reached the tolerance.
        diverged: (B,) an iterate turned NaN or inf; the sample was frozen at its last finite one.
        state_sum: (B, d) sum of the sample's own iterates ``z_1..z_{N_i}`` (ensemble readout).
        states: kept iterates, step n -> (B, d); all of them or only those asked for.
        threshold: the most iterates the solver may produce.
        nfe: number of batched evaluations of f.
        inverse: Broyden's factors, or None for solvers that keep no inverse estimate.
    """

    z0: Tensor
    final: Tensor
    residuals: Tensor
    abs_residuals: Tensor
    steps: Tensor
    converged: Tensor
    diverged: Tensor
    state_sum: Tensor
    states: dict[int, Tensor]
    threshold: int
    nfe: int
    inverse: BroydenInverse | None = None

    @property
    def num_steps(self) -> int:
        """Number of iterates the batch ran (the largest ``N_i``)."""
        return self.residuals.shape[1]

    def check_step(self, n: int) -> None:
        """Raise if ``z_n`` can never exist for this solver (n outside 0..threshold)."""
        if not 0 <= n <= self.threshold:
            raise ValueError(
                f"step n={n} is beyond the solver's threshold of {self.threshold} iterates"
            )

    def state(self, n: int) -> Tensor:
        """``z_n`` (B, d) for ``0 <= n <= threshold``; frozen samples give their last iterate."""
        self.check_step(n)
        if n == 0:
            return self.z0
        n_eff = min(n, self.num_steps)
        if n_eff not in self.states:
            raise KeyError(f"z_{n} was not kept by this solve; kept steps: {sorted(self.states)}")
        return self.states[n_eff]

    def residual(self, n: int) -> Tensor:
        """Relative residual (B,) of ``z_n`` for ``1 <= n <= threshold``."""
        self.check_step(n)
        if n == 0:
            raise ValueError("z_0 is the initial state; residuals start at z_1")
        return self.residuals[:, min(n, self.num_steps) - 1]

    def mean_state(self) -> Tensor:
        """Per-sample mean of the sample's own iterates ``z_1..z_{N_i}`` (B, d)."""
        count = self.steps.clamp(min=1).to(self.state_sum.dtype).unsqueeze(-1)
        return self.state_sum / count
