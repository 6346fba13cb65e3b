"""Exact resume (issue 8, item 4): a CPU run killed mid-epoch by its process id and rerun ends
with weights bit-identical to an uninterrupted run with the same seed; a changed configuration
is refused with the differing keys named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deq_attacks.cli import train as train_cli
from deq_attacks.records import to_jsonable
from deq_attacks.training import run_training
from tests.training_fixtures import tiny_preset

ROOT = Path(__file__).resolve().parents[1]


def _config():
    """3 epochs of 10 steps: epoch 1 pretrains (unrolled), epochs 2-3 PGD-AT with the exact
    gradient; dropout, augmentation, random starts and the Jacobian schedule (every other
    DEQ-mode step, stopped at epoch index 2) all draw on the saved RNG and counters."""
    return tiny_preset(
        "deq_large_exact_8_7",
        args={"channels": 8, "dropout": 0.1},
        train_limit=100,
        dev_size=20,
        batch_size=10,
        epochs=3,
        pretrain_steps=10,
        steps=3,
        jac_stop_epoch=2,
    )


def _weights(run_dir: Path) -> dict:
    state = json.loads((run_dir / "state.json").read_text())
    return load_file(str(run_dir / "checkpoints" / state["checkpoint"] / "model.safetensors"))


def _launch(config_file: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deq_attacks",
            "train",
            "--config",
            str(config_file),
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path: Path) -> None:
    config = _config()
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_jsonable(config)))
    killed = tmp_path / "killed"

    proc = _launch(config_file, killed)

    def kill_in_epoch_2() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            state_file = killed / "state.json"
            if state_file.exists() and json.loads(state_file.read_text())["epochs_done"] >= 1:
                break
            time.sleep(0.05)
        time.sleep(0.1)  # into epoch 2 (about a second of PGD-AT steps or more)
        os.kill(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_in_epoch_2)
    killer.start()  # meanwhile, the uninterrupted run in this process
    uninterrupted = run_training(config, tmp_path / "uninterrupted", log=lambda _: None)
    killer.join()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((killed / "state.json").read_text())["epochs_done"] == 1, "not mid-epoch 2"

    proc = _launch(config_file, killed)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming" in out and "after epoch 1" in out

    assert uninterrupted.state.epochs_done == 3
    expected, resumed = _weights(tmp_path / "uninterrupted"), _weights(killed)
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert value.dtype == resumed[key].dtype and value.equal(resumed[key]), key
    before = json.loads((tmp_path / "uninterrupted" / "state.json").read_text())["history"]
    after = json.loads((killed / "state.json").read_text())["history"]
    for a, b in zip(before, after, strict=True):  # the same losses and dev results
        for key in ("train_loss", "dev_pgd_accuracy", "dev_residuals", "lr", "jacobian_penalty"):
            assert a[key] == b[key], key


def test_changed_config_is_refused(tmp_path: Path, capsys) -> None:
    config = tiny_preset("deq_large_unrolling")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_jsonable(config)))
    out = tmp_path / "run"
    assert train_cli.main(["--config", str(config_file), "--out-dir", str(out)]) == 0
    capsys.readouterr()
    code = train_cli.main(
        ["--config", str(config_file), "--out-dir", str(out), "--optimiser.lr", "0.002",
         "--threat.eps", "0.2"]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "optimiser.lr: 0.001 -> 0.002" in err and "threat.eps: 0.1 -> 0.2" in err
    # run-only settings may change: this reruns nothing (all epochs done) and succeeds
    threads = torch.get_num_threads()
    argv = ["--config", str(config_file), "--out-dir", str(out), "--execution.threads", "2"]
    assert train_cli.main(argv) == 0
    assert torch.get_num_threads() == threads  # the run's threads do not outlive it
