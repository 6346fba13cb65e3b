"""The demo's training: the ``demo`` preset through ``run_training``, its settings resolved and
validated before any work (a bad one is one line on stderr and exit code 2, no traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deq_attacks.cli import demo
from deq_attacks.training import preset
from deq_attacks.training.config import Device


def test_demo_resolves_the_preset_with_its_shared_settings() -> None:
    args = demo.build_parser().parse_args(
        ["--eps", "0.2", "--steps", "5", "--seed", "3", "--train-set", "epochs=4"]
    )
    config = demo.training_config(args)
    expected = preset("demo")
    assert (config.eps, config.steps, config.seed, config.epochs) == (0.2, 5, 3, 4)
    assert (config.step, config.device, config.threads) == (0.025, Device.CPU, 1)
    assert config.differences(expected) == [
        "epochs: 4 -> 8",
        "eps: 0.2 -> 0.1",
        "steps: 5 -> 10",
        "seed: 3 -> 0",
    ]
    evaluation = demo.demo_config(args)
    assert (evaluation.eps, evaluation.steps) == (0.2, 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-set", "bogus=1"], "unknown setting 'bogus'"),
        (["--train-set", "epochs"], "--train-set expects KEY=VALUE"),
        (["--train-set", "dev_size=5000"], "dev_size=5000 is not below the 1200 images"),
        (["--train-set", "model=nowhere.models:deq", "--train-set", "width=none",
          "--train-set", "dropout=none"], "cannot import 'nowhere.models'"),  # fmt: skip
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--n-test", "1000"], "only 597 held-out images for --n-dev 100 + --n-test 1000"),
        (["--data", "missing.npz"], "no held-out split"),
        (["--train-set", "bf16=true"], "bf16 autocast is for CUDA only"),
    ],
)
def test_bad_settings_stop_before_training(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--out-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("deq-attacks demo: ") and err.count("\n") == 1
    assert not (tmp_path / "training" / "state.json").exists()
