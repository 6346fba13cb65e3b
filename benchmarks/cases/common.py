"""What every benchmark case shares: the context it runs in, the rows it returns, and helpers.

Every forward solve here uses ``tol=0`` so that it runs all its iterates: the cost then does not
depend on how far an untrained model happens to converge (a trained DEQ is far from its fixed
point after 8 steps anyway: relative residual ~0.2). Each row says whether that held.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.memory import peak_bytes
from benchmarks.timing import paired_ratio
from benchmarks.workloads import Settings, Workload
from deq_attacks import DEQ, DEQEstimator, GradientEstimate, Readout
from deq_attacks.solvers import Solver

EPS = 8 / 255
EPS_STEP = 2 / 255


@dataclass
class Context:
    """What every case needs: the workload, the settings and the device."""

    workload: Workload
    settings: Settings
    device: torch.device


@dataclass
class Result:
    """One row of the table.

    measured = numerator / denominator (median over repetitions); target None = reported
    only. unit: "s" (seconds per call) or "bytes" (peak). samples: per-repetition ratios.
    """

    id: str
    ratio: str
    measured: float
    target: float | None
    workload: str
    timed: str
    notes: str
    numerator: float
    denominator: float
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.measured <= self.target

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["met"] = self.met
        return data


@dataclass
class Measurement:
    """One cell of a table of raw values (rendered as a grid, not as a ratio row).

    table: the grid's title; row, column: the cell's labels; value in ``unit`` ("s" per
    call or "bytes" of peak memory).
    """

    table: str
    row: str
    column: str
    value: float
    unit: str
    workload: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


Row = Result | Measurement
Bounds = tuple[tuple[tuple[str, ...], str], ...]
"""What bounds each ratio, independent of the machine: (row ids, text) pairs."""


def timed_row(
    ctx: Context,
    id_: str,
    ratio: str,
    target: float | None,
    numerator: Callable[[], object],
    denominator: Callable[[], object],
    timed: str,
    notes: str,
) -> Result:
    """A row from ``paired_ratio`` of two callables under the context's settings."""
    s = ctx.settings
    timing = paired_ratio(
        numerator,
        denominator,
        device=ctx.device,
        repeats=s.repeats,
        warmup=s.warmup,
        min_block_s=s.min_block_s,
        clock=s.clock,
    )
    spread = f"per-repeat ratios {min(timing.ratios):.3f}..{max(timing.ratios):.3f}"
    return Result(
        id=id_,
        ratio=ratio,
        measured=timing.ratio,
        target=target,
        workload=ctx.workload.name,
        timed=timed,
        notes=f"{notes}; {ms(timing.numerator_s)} vs {ms(timing.denominator_s)}; {spread}",
        numerator=timing.numerator_s,
        denominator=timing.denominator_s,
        unit="s",
        samples=list(timing.ratios),
    )


def median_peak(ctx: Context, call: Callable[[], object]) -> int:
    """Median peak bytes of ``call`` over up to 3 measurements, after one untimed call."""
    call()
    repeats = max(1, min(ctx.settings.repeats, 3))
    return int(statistics.median(peak_bytes(call, ctx.device) for _ in range(repeats)))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def full_solver(cls: type[Solver], threshold: int) -> Solver:
    """``cls`` running every one of its ``threshold`` iterates (tol=0)."""
    return cls(threshold=threshold, tol=0.0)


def full_run_note(deq: DEQ, threshold: int) -> str:
    """Whether the last forward solve of ``deq`` ran all ``threshold`` iterates per sample."""
    trajectory = deq.last_trajectory
    if trajectory is None:
        return "no solve recorded"
    if int(trajectory.steps.min()) == threshold:
        return f"all {threshold} iterates ran"
    return f"WARNING: some samples stopped after {int(trajectory.steps.min())} iterates"


def estimator(
    ctx: Context,
    deq: DEQ,
    estimate: GradientEstimate | None = None,
    defense: Readout | None = None,
) -> DEQEstimator:
    return DEQEstimator(
        deq,
        input_shape=ctx.workload.input_shape,
        nb_classes=ctx.workload.num_classes,
        estimate=estimate,
        defense=defense,
        clip_values=(0.0, 1.0),
        device_type="gpu" if ctx.device.type == "cuda" else "cpu",
    )


def one_hot(y: Tensor, classes: int) -> Tensor:
    return nn.functional.one_hot(y, classes).to(torch.float32)


def loss_gradient_call(
    est: DEQEstimator, estimate: GradientEstimate, x: Tensor, y: Tensor
) -> Callable[[], object]:
    """A call of ``est.loss_gradient(x, y)`` with ``estimate`` selected."""

    def call() -> object:
        with est.using(estimate=estimate):
            return est.loss_gradient(x, y)

    return call
