"""The demo's training: the ``demo`` preset through ``run_training``, its settings resolved and
validated before any work (a bad one is one line on stderr and exit code 2, no traceback)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deq_attacks.cli import demo
from deq_attacks.evaluation import EvaluationConfig, Mode, SweepConfig, SweepMode
from deq_attacks.evaluation.presets import evaluation_preset
from deq_attacks.training import preset
from deq_attacks.training.config import Device


def test_demo_resolves_the_preset_with_its_shared_settings() -> None:
    _, _, config, evaluation = demo.resolve(
        ["--eps", "0.2", "--steps", "5", "--seed", "3", "--train.optimiser.epochs", "4"]
    )
    expected = preset("demo")
    t, e = config.threat, config.execution
    assert (t.eps, t.steps, e.seed, config.optimiser.epochs) == (0.2, 5, 3, 4)
    assert (t.step, e.device, e.threads) == (0.025, Device.CPU, 1)
    assert config.differences(expected) == [
        "threat.eps: 0.2 -> 0.1",
        "threat.steps: 5 -> 10",
        "optimiser.epochs: 4 -> 8",
        "execution.seed: 3 -> 0",
    ]
    # the evaluation: the digits preset with the demo's sweep, the full table and the grid
    # sweep (the README's table), the shared options applied
    digits = evaluation_preset("digits").apply(
        EvaluationConfig(sweep=demo.DEMO_SWEEP, mode=Mode.TABLE, sweep_mode=SweepMode.GRID)
    )
    assert demo.evaluation_defaults() == digits
    assert evaluation == dataclasses.replace(digits, eps=0.2, steps=5, seed=3)
    # the nested form wins over a shortcut; --sweep adds to the demo's grid
    _, _, config, evaluation = demo.resolve(
        [
            "--eps",
            "0.2",
            "--eval.eps",
            "0.3",
            "--sweep",
            "adjoint.beta=1.0",
            "--preset",
            "cpu_exact",
        ]  # fmt: skip
    )
    assert (config.threat.eps, evaluation.eps) == (0.2, 0.3)
    assert config.model == preset("cpu_exact").model
    assert evaluation.sweep == SweepConfig(
        {"unrolled": {"k": "1,5", "lam": "1.0"}, "adjoint": {"beta": "1.0"}}
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train.bogus", "1"], "unrecognized arguments: --train.bogus 1"),
        (["--train.optimiser.epochs", "many"], 'key "train.optimiser.epochs"'),
        (["--train.epochs", "4"], "--train.epochs is now --train.optimiser.epochs"),
        (["--train.data.dev_size", "5000"], "dev_size=5000 is not below the 1200 images"),
        (
            ["--train.model.name", "nowhere.models:deq", "--train.model.args", "{}"],
            "cannot import 'nowhere.models'",
        ),  # fmt: skip
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--n-test", "1000"], "only 597 held-out images for --n_dev 100 + --n_test 1000"),
        (["--data", "missing.npz"], "not 'digits', 'cifar10:ROOT' or an arrays file"),
        (["--train.execution.bf16", "true"], "bf16 autocast is for CUDA only"),
        (["--eval.steps", "0"], "steps must be an int >= 1, got 0"),
        (["--eps", "2"], "eps must be in (0, 1]"),
    ],
)
def test_bad_settings_stop_before_training(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch already ran in this process: the demo's CPU kernels cannot be pinned here
    assert demo.main(["--out-dir", str(tmp_path), "--native_kernels", "true", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("deq-attacks demo: ") and err.count("\n") == 1
    assert not (tmp_path / "training" / "state.json").exists()


def test_demo_refuses_to_pin_kernels_after_torch_ran(tmp_path: Path, capsys) -> None:
    """The demo pins torch's CPU kernels to AVX2 (its table is then the same on every x86-64
    CPU); in a process whose torch already chose AVX-512 kernels it says so and stops."""
    import platform

    import torch

    torch.ones(8) * 2  # torch has run: on an AVX-512 CPU its kernels are chosen now
    if platform.machine().lower() not in ("x86_64", "amd64") or not (
        torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    ):
        pytest.skip("no AVX-512 kernels chosen here: nothing to refuse")
    import os

    environment = dict(os.environ)
    assert demo.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "must run before the first torch operation" in err and err.count("\n") == 1
    assert not (tmp_path / "training").exists()
    # nothing pinned: the environment (inherited by later subprocesses) is as it was
    assert dict(os.environ) == environment
