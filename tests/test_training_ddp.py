"""DistributedDataParallel through torchrun (issue 8, item 5): two gloo processes on CPU, each
making the adversaries of its own half of every global batch, reach the same weights (to float
tolerance) as one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deq_attacks.records import to_jsonable
from deq_attacks.training import run_training
from deq_attacks.training.build import training_model
from tests.training_fixtures import tiny_preset

ROOT = Path(__file__).resolve().parents[1]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = json.loads((run_dir / "state.json").read_text())
    return load_file(str(run_dir / "checkpoints" / state["checkpoint"] / "model.safetensors"))


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    # Per-sample computations only, so the two shards of a batch equal the whole: no dropout,
    # no augmentation, no Jacobian probes and no random PGD start (each rank draws its own
    # random numbers); GroupNorm and per-sample Broyden keep samples independent.
    config = tiny_preset(
        "deq_large_exact_8_7",
        args={"channels": 8},
        train_limit=48,
        batch_size=16,
        epochs=2,
        pretrain_steps=3,
        steps=3,
        crop_padding=0,
        flip=False,
        jac_weight=0.0,
        random_start=False,
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_jsonable(config)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "deq_attacks",
        "train",
        "--config",
        str(config_file),
        "--out-dir",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "2 process(es)" in proc.stdout

    one = run_training(config, tmp_path / "one", log=lambda _: None)
    torch.manual_seed(config.execution.seed)  # the initial weights every rank starts from
    one_init = training_model(config, (1, 8, 8), 10).state_dict()
    two_state = json.loads((tmp_path / "two" / "state.json").read_text())
    assert two_state["global_step"] == one.state.global_step == 6
    # the training loss is averaged over both ranks: the global batch's mean
    for a, b in zip(one.state.history, two_state["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    expected, got = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # and training moved the weights well beyond that tolerance (6 Adam steps of lr ~1e-3)
    moved = max(float((value - one_init[key]).abs().max()) for key, value in expected.items())
    assert moved > 1e-3
