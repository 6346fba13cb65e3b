"""How time and peak memory grow with the solver's threshold N and the batch B (small DEQ).

Measured for predict (Broyden and Anderson) and for one Exact, Adjoint(n=N) and
BackpropThroughSolver input gradient, at every N in ``settings.scaling_thresholds`` and B in
``settings.scaling_batches``. Each (operation, resource) gets two ratio rows, largest over
smallest N (at the middle batch) and largest over smallest B (at the smallest N), whose target
is the largest growth theory predicts for it (``(ratio)^p`` for the highest power p of its
order) with 10% slack: nothing may grow faster than its order says. The raw values go in two
grids. Run on the small workload only (DEQ-Large at batch 256 and 32 iterates is hours on a
CPU): other workloads get no rows.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from benchmarks.cases.common import (
    Bounds,
    Context,
    Measurement,
    Result,
    Row,
    estimator,
    full_solver,
    median_peak,
    mib,
    ms,
)
from benchmarks.timing import time_once
from deq_attacks import (
    Adjoint,
    Anderson,
    BackpropThroughSolver,
    Broyden,
    Exact,
    GradientEstimate,
)
from deq_attacks.gradients import input_gradient, loss_cotangent
from deq_attacks.solvers import Solver

SLACK = 1.1

BOUNDS: Bounds = (
    (
        ("scaling_*",),
        "Orders, with f one evaluation of the map per sample, d the state size, a f's "
        "activations per sample, K Exact's backward threshold (fixed): predict with Broyden "
        "costs O(N B (f + N d)) time (its low-rank products with B_n grow with n) and O(N B d) "
        "memory (its factors); with Anderson O(N B (f + m d)) time and O(m B d) memory (its "
        "window of m = 5), constant in N. Exact: the forward solve plus O(K B (f + K d)) for "
        "the backward Broyden solve; memory O((N + K) B d). Adjoint(n=N): the forward solve "
        "plus N VJPs and N products with B_m^T, O(N B (f + N d)) time, O(N B d) memory (factors "
        "and kept iterates). BackpropThroughSolver: the forward solve with autograd and its "
        "backward, O(N B (f + N d)) time, O(N B a) memory (every step's activations). All are "
        "linear in B; time grows slower at small B where per-call overheads dominate, and "
        "faster where a call's memory leaves the caches and is new to the process: each page "
        "it touches first costs a page fault (the notes count them per call, CPU), and "
        "glibc returns large freed blocks to the system, so the next call faults them again.",
    ),
)


@dataclass(frozen=True)
class Operation:
    """One measured call: its label, its orders in N (highest power of N in time and in
    memory) and how to build it for a threshold and a batch."""

    name: str
    label: str
    time_power: int
    memory_power: int
    order: str


OPERATIONS: tuple[Operation, ...] = (
    Operation("predict_broyden", "predict, Broyden", 2, 1, "O(N B (f + N d)) time, O(N B d) mem"),
    Operation("predict_anderson", "predict, Anderson", 1, 0, "O(N B (f + m d)) time, O(m B d) mem"),
    Operation("exact", "Exact", 2, 1, "O((N + K) B f + (N^2 + K^2) B d) time, O((N + K) B d) mem"),
    Operation("adjoint", "Adjoint(n=N)", 2, 1, "O(N B (f + N d)) time, O(N B d) mem"),
    Operation("bptt", "BackpropThroughSolver", 2, 1, "O(N B (f + N d)) time, O(N B a) mem"),
)


def _call(ctx: Context, op: Operation, threshold: int, batch: int) -> Callable[[], object]:
    """The operation on a fresh model with a threshold-``threshold`` solver, batch ``batch``."""
    solver: Solver = full_solver(Anderson if op.name == "predict_anderson" else Broyden, threshold)
    deq = ctx.workload.model(ctx.device, solver=solver)
    x, y = dataclasses.replace(ctx.workload, batch=batch).batch_data(ctx.device)
    if op.name.startswith("predict"):
        est = estimator(ctx, deq)
        x_np = x.cpu().numpy()
        return lambda: est.predict(x_np, batch_size=batch)
    estimates: dict[str, GradientEstimate] = {
        "exact": Exact(backward_solver=full_solver(Broyden, ctx.settings.threshold)),
        "adjoint": Adjoint(n=threshold),
        "bptt": BackpropThroughSolver(),
    }
    estimate = estimates[op.name]
    cotangent = loss_cotangent(nn.CrossEntropyLoss(reduction="sum"), y)
    return lambda: input_gradient(deq, estimate, x, cotangent)


def _seconds(ctx: Context, call: Callable[[], object]) -> tuple[float, float]:
    """Median seconds per call over the repetitions (at most 3), after the warm-up calls, and
    the median minor page faults per call (0 on CUDA)."""
    s = ctx.settings
    for _ in range(s.warmup):
        call()
    times, faults = [], []
    for _ in range(max(1, min(s.repeats, 3))):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times.append(time_once(call, ctx.device, clock=s.clock))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    counted = ctx.device.type == "cpu"
    return statistics.median(times), float(statistics.median(faults)) if counted else 0.0


def run(ctx: Context) -> list[Row]:
    if ctx.workload.name != "small":
        return []
    s = ctx.settings
    thresholds, batches = s.scaling_thresholds, s.scaling_batches
    rows: list[Row] = []
    for op in OPERATIONS:
        # (resource, threshold, batch) -> value; page faults per timed call
        values: dict[tuple[str, int, int], float] = {}
        faults: dict[tuple[int, int], float] = {}
        for threshold in thresholds:
            for batch in batches:
                call = _call(ctx, op, threshold, batch)
                values["time", threshold, batch], faults[threshold, batch] = _seconds(ctx, call)
                values["memory", threshold, batch] = float(median_peak(ctx, call))
                for kind, table, unit in GRIDS:
                    rows.append(
                        Measurement(
                            table=f"scaling: {table}",
                            row=f"{op.label}, N={threshold}",
                            column=f"B={batch}",
                            value=values[kind, threshold, batch],
                            unit=unit,
                            workload=ctx.workload.name,
                        )
                    )
        rows += _ratio_rows(ctx, op, values, faults)
    return rows


GRIDS = (("time", "time per call", "s"), ("memory", "peak memory", "bytes"))


def _ratio_rows(
    ctx: Context,
    op: Operation,
    values: dict[tuple[str, int, int], float],
    faults: dict[tuple[int, int], float],
) -> list[Row]:
    """Largest over smallest N (at the middle batch) and largest over smallest B (at the
    smallest N), for time and memory, each against the growth its order allows."""
    thresholds, batches = ctx.settings.scaling_thresholds, ctx.settings.scaling_batches
    mid_batch = batches[len(batches) // 2]
    low_n, high_n, low_b, high_b = thresholds[0], thresholds[-1], batches[0], batches[-1]
    axes = (
        ("N", f"{high_n} / {low_n} at B={mid_batch}", (high_n, mid_batch), (low_n, mid_batch)),
        ("B", f"{high_b} / {low_b} at N={low_n}", (low_n, high_b), (low_n, low_b)),
    )
    rows: list[Row] = []
    for kind, _, unit in GRIDS:
        power = op.time_power if kind == "time" else op.memory_power
        shown = ms if kind == "time" else mib
        for axis, label, at_hi, at_lo in axes:
            hi, lo = values[kind, at_hi[0], at_hi[1]], values[kind, at_lo[0], at_lo[1]]
            factor = high_n / low_n if axis == "N" else high_b / low_b
            allowed = factor ** (power if axis == "N" else 1)
            expected = f"N^{power}" if axis == "N" else "B^1"
            order = math.log(hi / lo) / math.log(factor)
            notes = f"{shown(hi)} vs {shown(lo)}; empirical order {order:.2f}"
            if kind == "time" and ctx.device.type == "cpu":
                notes += f"; page faults per call {faults[at_hi]:.0f} vs {faults[at_lo]:.0f}"
            rows.append(
                Result(
                    id=f"scaling_{op.name}_{kind}_in_{axis}",
                    ratio=f"{op.label}, {kind}: {axis} {label}",
                    measured=hi / lo,
                    target=allowed * SLACK,
                    workload=ctx.workload.name,
                    timed=f"{op.label} ({op.order}); at most {expected} growth allowed",
                    notes=notes,
                    numerator=hi,
                    denominator=lo,
                    unit=unit,
                )
            )
    return rows
