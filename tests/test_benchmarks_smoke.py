"""Smoke test of the benchmark suite: it runs end to end and reports every ratio.

Timings are never asserted against targets here (they depend on the machine); only that each
ratio and each grid value came out as a finite positive number, that the JSON and the markdown
page agree, and that a run of some cases replaces only their rows.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package lives beside deq_attacks, not in it

from benchmarks.cases import CASES  # noqa: E402
from benchmarks.memory import peak_bytes  # noqa: E402

EXPECTED = {
    "ensemble_adjoint",
    "ensemble_unrolled",
    "adjoint_vs_unrolled",
    "adjoint_reuse_vs_unrolled",
    "adjoint_floor",
    "art_pgd_unrolled",
    "art_pgd_adjoint",
    "art_pgd_floor_unrolled",
    "art_pgd_floor_adjoint",
    "broyden_vs_torchdeq",
    "memory_early_broyden",
    "memory_ensemble_broyden",
    "memory_early_anderson",
    "memory_ensemble_anderson",
    "memory_early_fixedpointiteration",
    "memory_ensemble_fixedpointiteration",
    "memory_early_vs_final",
    "memory_ensemble_vs_final",
    "train_phantom_vs_exact",
    "bptt_vs_unrolled",
    "bptt_vs_adjoint",
    "bptt_checkpoint_vs_unrolled",
    "memory_bptt_vs_unrolled",
    "memory_bptt_checkpoint_vs_unrolled",
    "memory_adjoint_vs_unrolled",
    "pgd_at_phantom_vs_exact",
    "shared_runs_vs_distinct",
    "shared_runs_vs_cells",
    "bookkeeping_broyden",
    "bookkeeping_broyden_keep",
    "bookkeeping_anderson",
    "bookkeeping_fixed_point",
    "bookkeeping_broyden_floor",
    "bookkeeping_anderson_floor",
    "cascade_vs_full",
    "cascade_vs_full_eps0.2",
    "cascade_vs_full_all",
    "cascade_vs_full_eps0.2_all",
    "verdict_vs_table",
    "verdict_vs_strongest",
    "racing_vs_grid_demo",
    "racing_vs_grid_mnist",
    "verdict_vs_table_paper",
} | {
    f"scaling_{op}_{resource}_in_{axis}"
    for op in ("predict_broyden", "predict_anderson", "exact", "adjoint", "bptt")
    for resource in ("time", "memory")
    for axis in ("N", "B")
}


@pytest.mark.slow
def test_quick_suite_reports_every_ratio(tmp_path: Path) -> None:
    out_dir, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    command = [
        sys.executable, "-m", "benchmarks.run", "--quick", "--workload", "small",
        "--repeats", "1", "--threads", "1", "--out-dir", str(out_dir), "--docs", str(docs),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads((out_dir / "cpu.json").read_text())
    entry = data["workloads"]["small"]
    (run,) = entry["runs"]
    assert run["machine"]["threads"] == 1
    assert run["cases"] == list(CASES)
    results = {r["id"]: r for r in entry["results"]}
    from benchmarks.cases.verdict import MNIST

    # the MNIST DEQ's row needs the shared MNIST file
    assert set(results) == (EXPECTED if MNIST.is_file() else EXPECTED - {"racing_vs_grid_mnist"})
    assert {r["case"] for r in entry["results"]} == set(CASES)
    for id_, r in results.items():
        for key in ("measured", "numerator", "denominator"):
            value = r[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (id_, key)
        # one repetition: the median ratio is that repetition's numerator / denominator
        assert math.isclose(r["measured"], r["numerator"] / r["denominator"], rel_tol=1e-9)
        assert r["unit"] in ("s", "bytes", "f")  # f: f evaluations
        assert r["met"] is None if r["target"] is None else isinstance(r["met"], bool)

    # the cascade's per-sample verdict is the full matrix's
    for id_ in [i for i in EXPECTED if i.startswith("cascade_vs_full")]:
        assert "verdicts differ on 0 (defense, sample) pairs" in results[id_]["notes"]

    # the scaling grids: every (operation, N, B) cell, time and memory
    cells = entry["measurements"]
    assert len(cells) == 5 * 2 * 2 * 2
    assert all(math.isfinite(c["value"]) and c["value"] > 0 for c in cells)

    table = docs.read_text()
    assert "| ratio | measured | target | met? | workload | what was timed | notes |" in table
    for r in results.values():
        assert f"{r['measured']:.3f}" in table
    assert "### scaling: time per call (`small`)" in table
    assert "| predict, Broyden, N=2 |" in table

    # a run of one case replaces that case's rows and leaves the others
    before = {r["id"]: r["measured"] for r in entry["results"]}
    proc = subprocess.run(
        [*command, "--cases", "broyden_vs_torchdeq"], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((out_dir / "cpu.json").read_text())["workloads"]["small"]
    assert [r["cases"] for r in entry["runs"]] == [
        [c for c in CASES if c != "broyden_vs_torchdeq"],
        ["broyden_vs_torchdeq"],
    ]
    after = {r["id"]: r["measured"] for r in entry["results"]}
    assert set(after) == EXPECTED
    assert all(after[k] == v for k, v in before.items() if k != "broyden_vs_torchdeq")


@pytest.mark.parametrize("name", ["broyden", "anderson"])
def test_the_bare_floors_run_the_solvers_iteration(name: str) -> None:
    """The floor of a bookkeeping row computes what the solver computes (all samples active,
    tol=0): the same last iterate, over more steps than Anderson's window."""
    from benchmarks.cases import solver_bookkeeping
    from deq_attacks import Anderson, Broyden

    bare = getattr(solver_bookkeeping, f"bare_{name}")
    solver = {"broyden": Broyden, "anderson": Anderson}[name]
    torch.manual_seed(0)
    weight, bias = 0.1 * torch.randn(32, 32, dtype=torch.float64), torch.randn(5, 32).double()

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ weight.T + bias)

    z0 = torch.zeros(5, 32, dtype=torch.float64)
    trajectory = solver(threshold=8, tol=0.0, return_best=False).solve(f, z0, keep=[8])
    assert not torch.equal(trajectory.states[8], f(z0))  # 8 steps moved it
    torch.testing.assert_close(bare(f, z0, 8), trajectory.states[8], rtol=0, atol=1e-12)


def test_cpu_peak_bytes_counts_tensors_alive_at_once() -> None:
    """4 MB, then 4 MB more while the first lives, then the first freed: the peak is 8 MB; a
    tensor from before the call that is freed inside it does not lower the count."""
    before = torch.ones(250_000)

    def call() -> None:
        nonlocal before
        before = None  # frees a block allocated before recording started
        a = torch.ones(1000, 1000)
        b = a * 2
        del a
        c = b + 1
        del b, c

    peak = peak_bytes(call, torch.device("cpu"))
    assert 8_000_000 <= peak < 8_100_000, peak
