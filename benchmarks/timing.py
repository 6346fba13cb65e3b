"""Paired wall-clock timing: two callables timed alternately in one process, median ratio."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``calls`` back-to-back calls (synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


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
) -> PairedTiming:
    """Time ``numerator`` and ``denominator`` alternately ``repeats`` times; median ratio.

    Each repetition times one block of each side, the order swapped every repetition so that
    a slow drift of the machine (other processes, clocks) biases neither side; the reported
    ratio is the median of the per-repetition ratios. ``warmup`` untimed calls of each side
    come first (allocator, lazy initialisation, oneDNN/cuDNN kernel choice).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    probe = 0.0
    for _ in range(max(warmup, 1)):
        probe = max(probe, time_once(numerator, device), time_once(denominator, device))
    calls = max(1, math.ceil(min_block_s / probe)) if probe > 0 else 1
    num_times: list[float] = []
    den_times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats):
            if rep % 2 == 0:
                num_times.append(time_once(numerator, device, calls))
                den_times.append(time_once(denominator, device, calls))
            else:
                den_times.append(time_once(denominator, device, calls))
                num_times.append(time_once(numerator, device, calls))
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
