"""Smoke test of the cascade benchmark (``python -m benchmarks.cascade --quick``): it trains its
tiny model, runs both modes and writes its row; the two verdicts agree. Its ratio is not
asserted (it depends on the machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_cascade_benchmark_writes_its_row(tmp_path: Path) -> None:
    out = tmp_path / "cascade.json"
    command = [sys.executable, "-m", "benchmarks.cascade", "--quick", "--out", str(out),
               "--cache", str(tmp_path / "model")]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["id"] == "cascade_vs_full" and row["target"] == 0.5
    assert math.isfinite(row["measured"]) and row["measured"] > 0
    assert math.isclose(row["measured"], row["numerator"] / row["denominator"], rel_tol=1e-9)
    assert "verdicts differ on 0 (defense, sample) pairs" in row["notes"]
