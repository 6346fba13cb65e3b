"""Runs that behave: a finished rerun computes nothing, an interrupt (SIGINT) leaves a store that
resumes to the uninterrupted result, a cut line of the store is dropped, unconverged forwards
warn once per call site with a count in the report, the attack batch follows the device."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluation_fixtures import SQUARE, TINY, splits, tiny_estimator

from deq_attacks.checkpoints import save_weights
from deq_attacks.cli import main
from deq_attacks.deq.convergence import NotConvergedWarning
from deq_attacks.evaluation import EvaluationConfig, SweepConfig, evaluate_model
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
CHEAP = dataclasses.replace(
    TINY,
    attacks=f"pgd,{SQUARE}",
    bptt=False,
    sweep=SweepConfig(
        {"adjoint": {"n": "1", "beta": "1.0"}, "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}
    ),
)


def cli_args(weights: Path, out_dir: Path) -> list[str]:
    """A tiny ``deq-attacks evaluate`` of the tiny MLP DEQ (16 test images, blocks of 8)."""
    return [
        "evaluate", "--model.name", "mlp_deq", "--model.args.in_features", "64",
        "--model.args.num_classes", "10", "--model.args.hidden", "16",
        "--model.forward_threshold", "4", "--model.checkpoint", str(weights),
        "--n-dev", "8", "--n-test", "16", "--steps", "2",
        "--attacks", "pgd,autoattack:iterations=2,queries=10,target_classes=2,square:queries=20",
        "--long_steps", "3", "--batch_size", "8",
        "--diagnostic_samples", "2", "--sweep", "adjoint.n=1", "--sweep", "adjoint.beta=1.0",
        "--sweep", "unrolled.n=1", "--sweep", "unrolled.k=1", "--sweep", "unrolled.lam=1.0",
        "--eps", "0.1", "--step", "0.05", "--out-dir", str(out_dir),
    ]  # fmt: skip


def forbid_computation(monkeypatch) -> None:
    """Every attack run, forward scoring and measurement of the protocol fails."""

    def fail(*args, **kwargs):
        raise AssertionError("a finished step was recomputed")

    monkeypatch.setattr("deq_attacks.evaluation.distributed.BlockMap.mine", fail)  # every block
    for name in ("batch_outputs", "gradient_health", "exact_backward", "spectral_radii",
                 "alignment"):  # fmt: skip
        monkeypatch.setattr(f"deq_attacks.evaluation.measurements.{name}", fail)


def results(out_dir: Path) -> dict:
    """The results file without its wall times and its cost record (timed and counted)."""
    saved = json.loads((out_dir / "results.json").read_text())
    saved.pop("timings")
    saved.pop("cost")
    return saved


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    return save_weights(tiny_estimator(trained=True).deq, path)


@pytest.fixture(scope="module")
def uninterrupted(weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    assert main(cli_args(weights, out)) == 0
    return out


@pytest.mark.slow
def test_a_finished_cli_run_resumes_without_computing(
    weights, uninterrupted, monkeypatch, capsys
) -> None:
    before = results(uninterrupted)
    forbid_computation(monkeypatch)
    capsys.readouterr()
    assert main(cli_args(weights, uninterrupted)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert results(uninterrupted) == before


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_sigint_leaves_a_store_that_resumes_to_the_same_result(
    weights, uninterrupted, tmp_path
) -> None:
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deq_attacks", *cli_args(weights, out), "--threads", "1"]
    # SIGINT as a terminal would deliver it, whatever this process inherited
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # fmt: skip
    store = out / "store.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        # interrupt once the test split's first attack column has a finished block
        if store.exists() and '"block"' in store.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: every finished block is kept in" in err
    assert "Traceback" not in err
    assert not (out / "results.json").exists()
    lines = store.read_text().splitlines()
    assert json.loads(lines[0])["fingerprint"]
    assert any('"block"' in line for line in lines)
    # the rerun resumes and ends where the uninterrupted run ended
    assert main(cli_args(weights, out)) == 0
    resumed, whole = results(out), results(uninterrupted)
    for key in ("survived", "clean", "verdict", "extras", "sweep", "early_exit", "states"):
        assert resumed[key] == whole[key], key
    assert [c["verdict"] for c in resumed["diagnostics"]] == [
        c["verdict"] for c in whole["diagnostics"]
    ]


def test_the_store_drops_a_cut_line_and_refuses_another_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    store = ResultStore(path, {"a": 1}, Shards())
    store.put("step", {"x": np.arange(3)})
    store.put_block("column", 0, {"index": [0, 1]})
    store.put_block("column", 1, {"index": [2]})
    with path.open("a") as file:
        file.write('{"key": "column", "block": 2, "val')  # an interrupt mid-write
    again = ResultStore(path, {"a": 1}, Shards())
    assert again.resumed and again.get("step") == {"x": [0, 1, 2]}
    assert again.blocks("column") == {0: {"index": [0, 1]}, 1: {"index": [2]}}
    assert all(json.loads(line) for line in path.read_text().splitlines())  # rewritten whole
    again.put("column", {"index": [0, 1, 2]})
    assert ResultStore(path, {"a": 1}, Shards()).blocks("column") == {}
    other = ResultStore(path, {"a": 2}, Shards())
    assert not other.resumed and other.get("step") is None
    assert len(path.read_text().splitlines()) == 1  # started afresh
    report = tmp_path / "results.json"
    report.write_text(json.dumps({"settings": {}}, indent=1))
    with pytest.raises(ValueError, match="is not a result store"):
        ResultStore(report, {"a": 1}, Shards())
    assert json.loads(report.read_text()) == {"settings": {}}  # left as it was


def test_unconverged_forwards_warn_once_per_run_with_a_count() -> None:
    dev, test = splits()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate_model(tiny_estimator(trained=True), test, dev, CHEAP)
    found = [w for w in caught if issubclass(w.category, NotConvergedWarning)]
    assert len(found) == 1 and "call site(s)" in str(found[0].message)  # the run's summary
    records = {r["site"]: r for r in report.convergence}
    attack_site = next(s for s in records if "adversarial/defended.py:" in s)
    record = records[attack_site]
    assert record["calls"] > 10 and 0 < record["unconverged_calls"] <= record["calls"]
    assert record["samples_above"] > 0


def test_the_attack_batch_follows_the_device() -> None:
    assert EvaluationConfig().attack_batch(torch.device("cpu")) == 100
    assert EvaluationConfig().attack_batch(torch.device("cuda")) == 500
    assert EvaluationConfig(batch_size=7).attack_batch(torch.device("cuda")) == 7
    dev, test = splits(8, 8)
    config = dataclasses.replace(CHEAP, batch_size=None, diagnostic_samples=2)
    report = evaluate_model(tiny_estimator(trained=True), test, dev, config)
    assert report.settings["batch_size"] == 100 and report.settings["device"] == "cpu"
