"""Shared test set-up: two CPU threads, per-test seeds, and the shared data folder."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

#: ../shared beside the repository root (holds data/ with real arrays files).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest) -> Iterator[None]:
    """Seed torch, numpy and random from the test's id, so each test is reproducible alone."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _fresh_convergence_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is its own process run for NotConvergedWarning (it warns once per process)."""
    from deq_attacks.deq import convergence

    monkeypatch.setattr(convergence, "_PROCESS", convergence._ProcessRun())


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder beside the repository; skips the test when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared folder not found at {SHARED_DIR}")
    return SHARED_DIR
