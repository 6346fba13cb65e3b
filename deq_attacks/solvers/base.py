"""What every fixed-point solver shares: validated settings and the per-sample bookkeeping."""

from __future__ import annotations

import dataclasses
import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute

from deq_attacks.solvers.trajectory import BroydenInverse, Trajectory

FixedPointMap = Callable[[Tensor], Tensor]
"""A batched map ``z -> f(z)`` on flat states (B, d)."""

_NORM_EPS = 1e-12


class StopMode(enum.Enum):
    """Which residual a solver compares to its tolerance."""

    ABS = "abs"  # ||f(z) - z||
    REL = "rel"  # ||f(z) - z|| / ||f(z)||


def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """``||f(z) - z|| / ||f(z)||`` per sample, for flat (B, d) states; 0/0 gives 0."""
    return (fz - z).norm(dim=-1) / fz.norm(dim=-1).clamp(min=_NORM_EPS)


@dataclass(frozen=True)
class Solver(ABC):
    """Settings shared by all solvers, validated at construction.

    Args:
        threshold: the most iterates ``z_1..z_N`` to produce (N), at least 1.
        tol: a sample stops once its residual (per ``stop_mode``) is at most ``tol``;
            0 runs every sample for ``threshold`` steps unless it reaches an exact fixed point.
        stop_mode: compare the absolute or the relative residual to ``tol``.
        return_best: the answer is each sample's lowest-residual iterate (else its last one).
        rand_delta: a randomized threshold: each solve runs at most ``threshold - d`` steps, d
            drawn uniformly from 0..rand_delta by torch's global generator, once per solve (the
            paper's training configs' ``RAND_F_THRES_DELTA``); 0: the threshold is fixed.
            Iterates past the drawn threshold are frozen copies of its last one.
    """

    threshold: int = 8
    tol: float = 1e-3
    stop_mode: StopMode = StopMode.REL
    return_best: bool = True
    rand_delta: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise TypeError(f"threshold must be an int, got {type(self.threshold).__name__}")
        if self.threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {self.threshold}")
        if not isinstance(self.tol, (int, float)) or not math.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if isinstance(self.rand_delta, bool) or not isinstance(self.rand_delta, int):
            raise TypeError(f"rand_delta must be an int, got {type(self.rand_delta).__name__}")
        if not 0 <= self.rand_delta < self.threshold:
            raise ValueError(
                f"rand_delta must be in 0..threshold-1 = 0..{self.threshold - 1} (the drawn "
                f"threshold is at least 1), got {self.rand_delta}"
            )
        if not isinstance(self.stop_mode, StopMode):
            try:
                object.__setattr__(self, "stop_mode", StopMode(self.stop_mode))
            except ValueError:
                options = ", ".join(repr(m.value) for m in StopMode)
                raise ValueError(
                    f"unknown stop_mode {self.stop_mode!r}; choose one of {options}"
                ) from None

    def __repr__(self) -> str:
        """Only the settings that differ from the defaults, short enough to label a column."""
        changed = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                shown = value.value if isinstance(value, enum.Enum) else value
                changed.append(f"{f.name}={shown!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    @property
    def keeps_inverse(self) -> bool:
        """Whether the trajectory carries an inverse-Jacobian estimate ``B_n``."""
        return False

    @property
    def workspace_rows(self) -> int:
        """How many (B, d) rows a no-grad solve needs for what it returns besides the kept
        iterates (``_Recorder.workspace``); they are allocated together with those iterates."""
        return 0

    def draw_threshold(self) -> int:
        """The most steps one solve may run: ``threshold``, or with ``rand_delta`` the
        threshold less a uniform draw from 0..rand_delta (torch's global generator)."""
        if not self.rand_delta:
            return self.threshold
        return self.threshold - int(torch.randint(0, self.rand_delta + 1, ()).item())

    def solve(
        self,
        fn: FixedPointMap,
        z0: Tensor,
        keep: bool | Collection[int] = False,
        *,
        differentiable: bool = False,
        checkpoint: bool = False,
        limit: int | None = None,
    ) -> Trajectory:
        """Solve ``z = fn(z)`` from ``z0`` (B, d), by default without recording autograd.

        Args:
            fn: the batched map on flat states.
            z0: initial states (B, d), floating point and finite.
            keep: which iterates to keep in ``Trajectory.states``: True for all, False for
                none, or a collection of steps n (1-based).
            differentiable: record autograd through every step, so that ``final``, the kept
                ``states`` and ``state_sum`` are differentiable functions of ``z0`` and of
                whatever ``fn`` closes over, exactly as computed. Discrete decisions (stopping,
                the lowest-residual choice, skipped updates) are constants of that function;
                residuals are recorded detached. Memory grows linearly with the steps run.
            checkpoint: with ``differentiable``, recompute each evaluation of ``fn`` in the
                backward instead of keeping its activations (``torch.utils.checkpoint``).
            limit: stop every sample after this many steps (None: ``draw_threshold()``, the
                threshold unless it is randomized); the trajectory keeps ``threshold``.
        """
        if not isinstance(z0, Tensor) or z0.dim() != 2:
            shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
            raise ValueError(f"z0 must be a (batch, dim) tensor, got {shape}")
        if not z0.is_floating_point():
            raise TypeError(f"z0 must be floating point, got {z0.dtype}")
        if not torch.isfinite(z0).all():
            raise ValueError("z0 contains NaN or inf")
        if checkpoint and not differentiable:
            raise ValueError(
                "checkpoint=True needs differentiable=True (it recomputes f in the backward)"
            )
        limit = self.draw_threshold() if limit is None else limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        if differentiable:
            with torch.enable_grad():
                return self._solve(
                    _Recorder(self, fn, z0, keep, differentiable, checkpoint, limit=limit)
                )
        with torch.no_grad():
            return self._solve(_Recorder(self, fn, z0, keep, limit=limit))

    @abstractmethod
    def _solve(self, rec: _Recorder) -> Trajectory:
        """Run the iteration through ``rec`` and return ``rec.finish(...)``."""


class _Recorder:
    """Per-sample bookkeeping for one solve: residuals, stopping, divergence, best, kept states.

    A solver calls ``evaluate`` for f and ``record(n, z_new, f_new)`` once per step, and reads
    the current iterate ``z``, ``fz = f(z)``, its residual ``g = fz - z`` (B, d), ``fz_norm``
    (B,) and ``any_active``. The recorder keeps references to the tensors it is given and
    never writes into them: a solver must not write into ``z_new`` or ``f_new`` after recording
    them, nor into ``z``, ``fz`` or ``g``. A no-grad solve gets ``workspace``
    (``solver.workspace_rows``, B, d) to keep what it returns, else None.

    Every quantity is computed per sample, so one sample never changes another's result.
    Residuals and the decisions taken from them are computed on detached values, so in a
    differentiable solve they are constants (and a zero residual never meets the norm's
    infinite derivative). While every sample takes every step (the common case) no masking is
    done at all: one check per step decides it, on per-sample values.
    """

    def __init__(
        self,
        solver: Solver,
        fn: FixedPointMap,
        z0: Tensor,
        keep: bool | Collection[int],
        differentiable: bool = False,
        checkpoint: bool = False,
        limit: int | None = None,
    ) -> None:
        self.solver = solver
        self.limit = solver.threshold if limit is None else limit
        self.differentiable = differentiable
        self._checkpoint = checkpoint
        self._fn = fn
        self.nfe = 0
        self.z0 = z0
        batch = z0.shape[0]
        wanted = frozenset() if isinstance(keep, bool) else frozenset(keep)
        bad = [n for n in wanted if not 1 <= n <= solver.threshold]
        if bad:
            raise ValueError(
                f"cannot keep steps {sorted(bad)}: valid steps are 1..{solver.threshold}"
            )
        kept = range(1, solver.threshold + 1) if keep is True else sorted(wanted)
        self._kept_slot = {n: i for i, n in enumerate(kept)}
        # no-grad solves copy the kept iterates into one buffer (not a new tensor per step),
        # allocated at once with the solver's workspace: one block per solve, which the
        # allocator reuses from solve to solve; differentiable ones keep references
        self._kept: Tensor | None = None
        self.workspace: Tensor | None = None
        rows = 0 if differentiable else len(kept) + solver.workspace_rows
        if rows:
            block = z0.new_empty(rows, *z0.shape)
            self._kept, self.workspace = block[: len(kept)], block[len(kept) :]
        fz0 = self.evaluate(z0)
        self.z = z0
        self.fz = fz0
        self.g = fz0 - z0
        abs0, self.fz_norm = self.g.detach().norm(dim=-1), fz0.detach().norm(dim=-1)
        finite = self._finite_rows(abs0, self.fz_norm, z0, fz0)
        self.diverged = ~finite
        self.active = finite.clone()
        self.any_active = bool(finite.any())
        self._all_active = bool(finite.all())
        self._all_true = torch.ones(batch, dtype=torch.bool, device=z0.device)
        self.all_took = False
        self.converged = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.state_sum = torch.zeros_like(z0)
        self.states: dict[int, Tensor] = {}
        self._abs = abs0
        self._rel = abs0 / self.fz_norm.clamp(min=_NORM_EPS)
        self._abs_hist: list[Tensor] = []
        self._rel_hist: list[Tensor] = []
        self.best = z0
        self._best_crit = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)

    def evaluate(self, z: Tensor) -> Tensor:
        """``fn(z)``, counted, with its shape checked.

        In a differentiable solve, a sample whose candidate is not finite is evaluated at 0
        instead (it is recorded as diverged and its value is never used): f's backward at
        inf/NaN would otherwise turn its zero cotangent into NaN for that sample's history.
        """
        if self.differentiable and not bool(torch.isfinite(z.detach().sum())):
            # a finite sum proves every entry finite; otherwise check each sample
            z = torch.where(torch.isfinite(z).all(dim=-1, keepdim=True), z, 0.0)
        fz = recompute(self._fn, z, use_reentrant=False) if self._checkpoint else self._fn(z)
        self.nfe += 1
        if fz.shape != z.shape:
            raise ValueError(
                f"f returned shape {tuple(fz.shape)} for a state of shape {tuple(z.shape)}"
            )
        return fz

    @staticmethod
    def _finite_rows(abs_res: Tensor, f_norm: Tensor, z: Tensor, fz: Tensor) -> Tensor:
        """(B,) whether every entry of ``z`` and ``fz`` is finite, per sample.

        A finite ``||fz - z||`` and ``||fz||`` prove it; only samples whose norms are not
        finite (a NaN or inf entry, or a norm that overflowed) are checked entry by entry.
        """
        finite = torch.isfinite(abs_res) & torch.isfinite(f_norm)
        if bool(finite.all()):
            return finite
        rows = (~finite).nonzero().squeeze(1)
        finite = finite.clone()
        z_rows, fz_rows = z.detach().index_select(0, rows), fz.detach().index_select(0, rows)
        finite[rows] = torch.isfinite(z_rows).all(dim=-1) & torch.isfinite(fz_rows).all(dim=-1)
        return finite

    def _criterion(self, abs_res: Tensor, rel_res: Tensor) -> Tensor:
        return abs_res if self.solver.stop_mode is StopMode.ABS else rel_res

    def _merge(self, mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
        """Rows of ``new`` where ``mask`` (B,), else rows of ``old``, as a new tensor (neither
        input is written). No-grad solves copy whole rows (cheaper than ``torch.where``)."""
        if self.differentiable:
            return torch.where(mask.unsqueeze(-1), new, old)
        take = mask.nonzero().squeeze(1)
        if 2 * take.numel() >= mask.numel():
            base, src, rows = new, old, (~mask).nonzero().squeeze(1)
        else:
            base, src, rows = old, new, take
        return base.clone().index_copy_(0, rows, src.detach().index_select(0, rows))

    def record(self, n: int, z_new: Tensor, f_new: Tensor) -> Tensor:
        """Record iterate ``z_n`` and ``f(z_n)``; return the (B,) mask of samples that took it
        (read-only). ``all_took`` says whether every sample did.

        Samples not active (stopped earlier) and samples whose candidate is not finite keep
        their previous iterate; the latter are marked diverged and stop.
        """
        g_new = f_new - z_new
        abs_new, f_norm = g_new.detach().norm(dim=-1), f_new.detach().norm(dim=-1)
        rel_new = abs_new / f_norm.clamp(min=_NORM_EPS)
        crit = self._criterion(abs_new, rel_new)
        all_finite = all_better = none_converged = False
        if self._all_active:  # one synchronisation decides the common case
            flags = torch.stack(
                (
                    (torch.isfinite(abs_new) & torch.isfinite(f_norm)).all(),
                    (crit < self._best_crit).all(),
                    (crit > self.solver.tol).all(),
                )
            ).tolist()
            all_finite, all_better, none_converged = flags
        self.all_took = self._all_active and all_finite
        if self.all_took:
            took = self._all_true
            self.z, self.fz, self.g, self.fz_norm = z_new, f_new, g_new, f_norm
            self._abs, self._rel = abs_new, rel_new
            self.steps += 1
            self._add_to_sum(z_new)
        else:
            finite = self._finite_rows(abs_new, f_norm, z_new, f_new)
            took = self.active & finite
            self.diverged |= self.active & ~finite
            self.z = self._merge(took, z_new, self.z)
            self.fz = self._merge(took, f_new, self.fz)
            self.g = self._merge(took, g_new, self.g)
            self.fz_norm = torch.where(took, f_norm, self.fz_norm)
            self._abs = torch.where(took, abs_new, self._abs)
            self._rel = torch.where(took, rel_new, self._rel)
            self.steps += took.long()
            self._add_to_sum(self.z, took)
        self._abs_hist.append(self._abs)
        self._rel_hist.append(self._rel)
        if self.all_took and all_better:
            self.best, self._best_crit = self.z, crit
        else:
            better = took & (crit < self._best_crit)
            if bool(better.any()):
                self.best = self._merge(better, self.z, self.best)
                self._best_crit = torch.where(better, crit, self._best_crit)
        if not (self.all_took and none_converged):
            now_converged = took & (crit <= self.solver.tol)
            self.converged |= now_converged
            self.active = took & ~now_converged
            self.any_active = bool(self.active.any())
            self._all_active = bool(self.active.all())
        slot = self._kept_slot.get(n)
        if slot is not None:
            self.states[n] = self.z if self._kept is None else self._kept[slot].copy_(self.z)
        if n >= self.limit and self.any_active:  # a drawn threshold: every sample stops here
            self.active = torch.zeros_like(self.active)
            self.any_active = self._all_active = False
        return took

    def _add_to_sum(self, z: Tensor, took: Tensor | None = None) -> None:
        """``state_sum += z`` for every sample, or for the samples in ``took`` (B,) only; in
        place unless autograd records it."""
        if self.differentiable:
            added = z if took is None else torch.where(took.unsqueeze(-1), z, 0.0)
            self.state_sum = self.state_sum + added
        elif took is None:
            self.state_sum.add_(z)
        else:
            rows = took.nonzero().squeeze(1)
            self.state_sum.index_add_(0, rows, z.index_select(0, rows))

    def finish(self, inverse: BroydenInverse | None = None) -> Trajectory:
        """Close the record after the last step run."""
        num_steps = len(self._rel_hist)
        if any(n > num_steps for n in self._kept_slot):
            # steps beyond the last one run are frozen copies of the last iterate
            self.states[num_steps] = self.z
        # a sample that diverged before its first finite iterate has best = z = z_0
        return Trajectory(
            z0=self.z0,
            final=self.best if self.solver.return_best else self.z,
            residuals=torch.stack(self._rel_hist, dim=1),
            abs_residuals=torch.stack(self._abs_hist, dim=1),
            steps=self.steps,
            converged=self.converged,
            diverged=self.diverged,
            state_sum=self.state_sum,
            states=self.states,
            threshold=self.solver.threshold,
            nfe=self.nfe,
            inverse=inverse,
        )
