"""Paired timing: two callables timed alternately in one process, median ratio.

``time_inside`` splits one call's time into the part spent inside a function it calls.

Two clocks: "wall" (``time.perf_counter``, synchronised on CUDA) and "cpu" (``time.process_time``,
the CPU seconds of this process). On a CPU shared with other jobs, single-threaded runs timed
by CPU seconds are not inflated by the time the process waits for a core; wall time is.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_once(
    fn: Callable[[], object], device: torch.device, calls: int = 1, clock: str = "wall"
) -> float:
    """Seconds per call of ``fn`` by ``clock``, averaged over ``calls`` back-to-back calls."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (now() - start) / calls


@dataclass(frozen=True)
class PairedTiming:
    """Result of ``paired_ratio``.

    ratio: median over repetitions of numerator time / denominator time.
    numerator_s, denominator_s: median seconds per call of each side.
    ratios: the per-repetition ratios (their spread shows the noise).
    calls: calls per timed block (short calls are repeated so a block lasts ``min_block_s``).
    """

    ratio: float
    numerator_s: float
    denominator_s: float
    ratios: tuple[float, ...]
    calls: int


def paired_ratio(
    numerator: Callable[[], object],
    denominator: Callable[[], object],
    *,
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    min_block_s: float = 0.0,
    clock: str = "wall",
) -> PairedTiming:
    """Time ``numerator`` and ``denominator`` alternately ``repeats`` times; median ratio.

    Each repetition times one block of each side, the order swapped every repetition so that
    a slow drift of the machine (other processes, clocks) biases neither side; the reported
    ratio is the median of the per-repetition ratios. ``warmup`` untimed calls of each side
    come first (allocator, lazy initialisation, oneDNN/cuDNN kernel choice); the slowest of
    them sets how many calls one block holds (none: one call per block).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    probe = 0.0
    for _ in range(warmup):
        for fn in (numerator, denominator):
            probe = max(probe, time_once(fn, device, clock=clock))
    calls = max(1, math.ceil(min_block_s / probe)) if probe > 0 else 1
    num_times: list[float] = []
    den_times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats):
            if rep % 2 == 0:
                num_times.append(time_once(numerator, device, calls, clock))
                den_times.append(time_once(denominator, device, calls, clock))
            else:
                den_times.append(time_once(denominator, device, calls, clock))
                num_times.append(time_once(numerator, device, calls, clock))
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    ratios = tuple(n / d for n, d in zip(num_times, den_times))
    return PairedTiming(
        ratio=statistics.median(ratios),
        numerator_s=statistics.median(num_times),
        denominator_s=statistics.median(den_times),
        ratios=ratios,
        calls=calls,
    )


def time_inside(
    outer: Callable[[Callable[[Tensor], Tensor]], object],
    inner: Callable[[Tensor], Tensor],
    device: torch.device,
    clock: str = "wall",
) -> tuple[float, float]:
    """Seconds of one call ``outer(wrapped)`` and the seconds spent inside its calls of
    ``wrapped`` (= ``inner``), measured in the same run.

    CPU: ``clock`` read around every inner call. CUDA: events recorded around every inner
    call and around the whole call (no synchronisation inside), summed after one sync.
    """
    if device.type == "cuda":
        pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

        def timed_cuda(z: Tensor) -> Tensor:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = inner(z)
            end.record()
            pairs.append((start, end))
            return out

        begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        begin.record()
        outer(timed_cuda)
        finish.record()
        synchronize(device)
        inside = sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        return begin.elapsed_time(finish) / 1e3, inside
    now = CLOCKS[clock]
    spent = [0.0]

    def timed(z: Tensor) -> Tensor:
        start = now()
        out = inner(z)
        spent[0] += now() - start
        return out

    start = now()
    outer(timed)
    return now() - start, spent[0]
