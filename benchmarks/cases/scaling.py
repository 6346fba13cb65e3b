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
        "linear in B; time grows slower at small B where per-call overheads dominate.",
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


def _seconds(ctx: Context, call: Callable[[], object]) -> float:
    """Median seconds per call over the repetitions (at most 3), after the warm-up calls."""
    s = ctx.settings
    for _ in range(s.warmup):
        call()
    repeats = max(1, min(s.repeats, 3))
    return statistics.median(time_once(call, ctx.device, clock=s.clock) for _ in range(repeats))


def run(ctx: Context) -> list[Row]:
    if ctx.workload.name != "small":
        return []
    s = ctx.settings
    thresholds, batches = s.scaling_thresholds, s.scaling_batches
    mid_batch = batches[len(batches) // 2]
    grid: dict[tuple[str, str, int, int], float] = {}
    rows: list[Row] = []
    for op in OPERATIONS:
        for threshold in thresholds:
            for batch in batches:
                call = _call(ctx, op, threshold, batch)
                grid[op.name, "time", threshold, batch] = _seconds(ctx, call)
                grid[op.name, "memory", threshold, batch] = float(median_peak(ctx, call))
                for resource, table, unit in (
                    ("time", "time per call", "s"),
                    ("memory", "peak memory", "bytes"),
                ):
                    rows.append(
                        Measurement(
                            table=f"scaling: {table}",
                            row=f"{op.label}, N={threshold}",
                            column=f"B={batch}",
                            value=grid[op.name, resource, threshold, batch],
                            unit=unit,
                            workload=ctx.workload.name,
                        )
                    )
        for resource, power in (("time", op.time_power), ("memory", op.memory_power)):
            shown = ms if resource == "time" else mib
            unit = "s" if resource == "time" else "bytes"
            low_n, high_n = thresholds[0], thresholds[-1]
            low_b, high_b = batches[0], batches[-1]
            for axis, ratio, key_hi, key_lo, bound in (
                (
                    "N",
                    f"{high_n} / {low_n} at B={mid_batch}",
                    (op.name, resource, high_n, mid_batch),
                    (op.name, resource, low_n, mid_batch),
                    (high_n / low_n) ** power,
                ),
                (
                    "B",
                    f"{high_b} / {low_b} at N={low_n}",
                    (op.name, resource, low_n, high_b),
                    (op.name, resource, low_n, low_b),
                    high_b / low_b,
                ),
            ):
                hi, lo = grid[key_hi], grid[key_lo]
                exponent = math.log(hi / lo) / math.log(
                    (high_n / low_n) if axis == "N" else (high_b / low_b)
                )
                expected = f"N^{power}" if axis == "N" else "B^1"
                rows.append(
                    Result(
                        id=f"scaling_{op.name}_{resource}_in_{axis}",
                        ratio=f"{op.label}, {resource}: {axis} {ratio}",
                        measured=hi / lo,
                        target=bound * SLACK,
                        workload=ctx.workload.name,
                        timed=f"{op.label} ({op.order}); at most {expected} growth allowed",
                        notes=f"{shown(hi)} vs {shown(lo)}; empirical order {exponent:.2f}",
                        numerator=hi,
                        denominator=lo,
                        unit=unit,
                    )
                )
    return rows
