"""Whether a forward solve reached its fixed point, and the warning when it did not.

A run warns once, with a count, not on every forward (an attack of 100 steps would print 100
warnings) nor once per call site (ART's attacks call the model from many places). Inside
``with ConvergenceLog() as log:`` (the scope of one run: an evaluation, a training) every
forward is counted per call site (the caller of ``predict`` or of ``module(x)``) in
``log.records``, and the run ends with one summary warning if any forward was above the limit.
Outside any scope (a user's own script) the process is the run: its first unconverged forward
warns, later ones are counted, and at exit one line says how many more there were.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

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


@dataclass
class SiteRecord:
    """The forwards of one call site within a ``ConvergenceLog``.

    Attributes:
        site: ``"file:line"`` of the call.
        calls: forwards checked; unconverged_calls: those with a sample above the limit.
        samples: samples checked; samples_above: above ``RESIDUAL_LIMIT`` (NaN counts).
        worst_residual: the largest finite relative residual seen (None: none finite).
        samples_nonfinite: samples whose residual was NaN or inf.
    """

    site: str
    calls: int = 0
    unconverged_calls: int = 0
    samples: int = 0
    samples_above: int = 0
    worst_residual: float | None = None
    samples_nonfinite: int = 0

    def add(self, above: int, total: int, worst: float | None, nonfinite: int) -> None:
        self.calls += 1
        self.unconverged_calls += int(above > 0)
        self.samples += total
        self.samples_above += above
        self.samples_nonfinite += nonfinite
        if worst is not None:
            self.worst_residual = max(worst, self.worst_residual or 0.0)

    def describe(self) -> str:
        worst = "none finite" if self.worst_residual is None else f"{self.worst_residual:.3g}"
        if self.samples_nonfinite:
            worst += f", {self.samples_nonfinite} NaN/inf"
        return (
            f"{self.site}: {self.unconverged_calls} of {self.calls} forwards, "
            f"{self.samples_above} of {self.samples} samples above {RESIDUAL_LIMIT} "
            f"(worst {worst})"
        )


_ACTIVE: contextvars.ContextVar[tuple[ConvergenceLog, ...]] = contextvars.ContextVar(
    "deq_attacks_convergence_logs", default=()
)


class _ProcessRun:
    """The run of a process outside any ``ConvergenceLog``: whether it warned, and what came
    after the warning."""

    def __init__(self) -> None:
        self.warned = False
        self.later_forwards = 0
        self.later_samples = 0

    def summary(self) -> None:
        if self.later_forwards:
            warnings.warn(
                f"{self.later_forwards} more forward(s) ({self.later_samples} samples) ended "
                f"above the relative residual {RESIDUAL_LIMIT} after the first "
                "NotConvergedWarning of this process",
                NotConvergedWarning,
                stacklevel=1,
            )


_PROCESS = _ProcessRun()
atexit.register(_PROCESS.summary)


class ConvergenceLog:
    """The scope of one run for convergence warnings: ``with ConvergenceLog() as log: ...``.

    Inside, forwards are only counted; on exit ``records`` holds one JSON-able summary per
    call site (every forward checked, converged or not) and, if any forward was above
    ``RESIDUAL_LIMIT``, one warning sums them up. Nested scopes each count and each warn
    once.
    """

    def __init__(self) -> None:
        self._sites: dict[str, SiteRecord] = {}
        self._token: contextvars.Token[tuple[ConvergenceLog, ...]] | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        """One summary per call site, in order of first appearance."""
        return [asdict(record) for record in self._sites.values()]

    def unconverged(self) -> list[SiteRecord]:
        """The call sites with at least one forward above the limit."""
        return [r for r in self._sites.values() if r.unconverged_calls]

    def _add(self, site: str, above: int, total: int, worst: float | None, bad: int) -> None:
        self._sites.setdefault(site, SiteRecord(site)).add(above, total, worst, bad)

    def __enter__(self) -> ConvergenceLog:
        if self._token is not None:
            raise RuntimeError("a ConvergenceLog is entered once")
        self._token = _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        assert self._token is not None
        _ACTIVE.reset(self._token)
        sites = self.unconverged()
        if sites:
            forwards = sum(r.unconverged_calls for r in sites)
            samples = sum(r.samples_above for r in sites)
            warnings.warn(
                f"{forwards} forward solves left {samples} samples above the relative residual "
                f"{RESIDUAL_LIMIT} (the fixed point was not reached; raise the solver's "
                f"threshold or check the model) at {len(sites)} call site(s): "
                + "; ".join(r.describe() for r in sites),
                NotConvergedWarning,
                stacklevel=2,
            )


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Forwards inside are neither counted by the active logs nor warned about (a check of the
    settings, e.g. ``DEQEstimator``'s construction probe, is not part of a run's work)."""
    token = _ACTIVE.set((ConvergenceLog(),))  # a log that nobody reads
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def warn_unconverged(residuals: Tensor, stacklevel: int = 2) -> None:
    """Count the residuals (B,) of one forward for its call site; outside any
    ``ConvergenceLog``, warn if some exceed ``RESIDUAL_LIMIT`` (NaN counts as above) and this
    process has not warned yet. ``stacklevel`` counts as ``warnings.warn``'s does from this
    function's caller (1: the caller itself); the frame it names is the call site, and the
    warning is attributed to it."""
    frame = sys._getframe(stacklevel)
    site = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    values = residuals.detach().double().cpu()
    above = int((~(values <= RESIDUAL_LIMIT)).sum())
    total = values.numel()
    finite = values[torch.isfinite(values)]
    worst = float(finite.max()) if finite.numel() else None
    nonfinite = total - finite.numel()
    logs = _ACTIVE.get()
    for log in logs:
        log._add(site, above, total, worst, nonfinite)
    if not above or logs:
        return
    if _PROCESS.warned:
        _PROCESS.later_forwards += 1
        _PROCESS.later_samples += above
        return
    _PROCESS.warned = True
    shown = "none finite" if worst is None else f"{worst:.3g}"
    if nonfinite:
        shown += f", {nonfinite} NaN/inf"
    warnings.warn(
        f"{above} of {total} samples ({above / total:.1%}) ended the forward solve with a "
        f"relative residual above {RESIDUAL_LIMIT} (worst {shown}): the fixed point was not "
        "reached; raise the solver's threshold or check the model (this process warns once: "
        "later ones are counted and summed up at exit; deq_attacks.deq.ConvergenceLog counts "
        "them per call site)",
        NotConvergedWarning,
        stacklevel=stacklevel + 1,
    )
