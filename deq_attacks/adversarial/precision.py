"""The arithmetic an attack's forwards and backwards run in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: The arithmetic an attack can run in: float32, or bfloat16 autocast (torch.autocast).
PRECISIONS = ("fp32", "bf16")


@contextlib.contextmanager
def precision(device: torch.device, name: str) -> Iterator[None]:
    """Run the forwards and backwards inside in ``name`` ("fp32": as they are; "bf16":
    ``torch.autocast`` to bfloat16 on ``device``'s type)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield
