"""Peak memory of one call: the most tensor bytes alive at once that the call allocated.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the call.
- CPU: ``torch.profiler`` with ``profile_memory=True``. While it records, c10's CPU allocator
  (which every torch CPU tensor goes through) reports each allocation and free with its
  pointer; replaying them in time order gives the bytes allocated during the call and still
  alive at each moment, and the peak is the largest such sum. Tensors that existed before the
  call (weights, inputs) are not counted; buffers that libraries allocate outside torch's
  allocator (oneDNN / BLAS scratch) are not seen.
  ``tracemalloc`` is no substitute: it sees Python objects, not tensor storage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

CPU_METHOD = (
    "CPU: peak of the tensor bytes allocated during the call and alive at once, replayed "
    "from torch.profiler's allocator events (profile_memory=True); weights and inputs allocated "
    "before the call excluded, oneDNN/BLAS scratch outside torch's allocator not seen"
)
CUDA_METHOD = "CUDA: torch.cuda.max_memory_allocated during the call minus memory allocated before"


def method(device: torch.device) -> str:
    """One line describing how ``peak_bytes`` measures on ``device``."""
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


def _allocation_events(nodes: Iterable[Any], device_type: str) -> list[tuple[int, int, int]]:
    """(time ns, pointer, signed size) of every allocation (+) and free (-) in an event tree."""
    events = []
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == device_type:
                events.append((node.start_time_ns, int(fields.ptr), int(fields.alloc_size)))
        stack.extend(node.children)
    return sorted(events)


def _peak_live(events: list[tuple[int, int, int]]) -> int:
    """Peak of the bytes allocated during the recording and not yet freed.

    Frees of blocks allocated before the recording are ignored: the allocator's own running
    total is not used because it drifts across recordings (frees that happen while the
    profiler is off are never subtracted from it).
    """
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, size in events:
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes of tensors allocated by ``fn()`` that were alive at the same time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        raise RuntimeError("the profiler recorded nothing")
    return _peak_live(_allocation_events(results.experimental_event_tree(), "cpu"))
