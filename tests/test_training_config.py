"""TrainConfig, the presets and the ``train`` command line: every setting validated before any
work, presets carrying the paper's recipe (Table 7, 10), the run folder's config record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from deq_attacks.acceleration import COMPILE_MODES
from deq_attacks.cli import SUBCOMMANDS
from deq_attacks.cli import train as train_cli
from deq_attacks.cli.options import CommandError
from deq_attacks.deq import DEQ, ImplicitGradient
from deq_attacks.models import create_model
from deq_attacks.records import to_jsonable
from deq_attacks.solvers import Anderson, Broyden, FixedPointIteration
from deq_attacks.training import PRESETS, TrainConfig, preset
from deq_attacks.training.build import build_model, jacobian_schedule
from deq_attacks.training.config import RUN_ONLY_KEYS, Device, Gradient
from tests.training_fixtures import PAPER_PRESETS


def test_paper_presets_carry_table_7() -> None:
    assert set(PAPER_PRESETS) <= set(PRESETS)
    for name in PAPER_PRESETS:
        c = preset(name)
        assert (c.batch_size, c.lr, c.epochs, c.device) == (96, 1e-3, 150, Device.CUDA)
        assert (c.eps, c.step, c.steps, c.random_start) == (8 / 255, 2 / 255, 10, True)
        assert (c.data, c.crop_padding, c.flip) == ("cifar10", 4, True)
        if c.is_deq:
            assert c.pretrain_steps == 16000 and c.pretrain_depth == 8
            assert (c.jac_weight, c.jac_frequency, c.jac_stop_epoch) == (0.4, 0.02, 90)
        else:  # baselines: no DEQ-only steps
            assert c.pretrain_steps == 0 and c.jac_weight == 0
    thresholds = {
        (
            preset(f"deq_large_exact_{f}_{b}").forward_threshold,
            preset(f"deq_large_exact_{f}_{b}").backward_threshold,
        )
        for f, b in ((8, 7), (18, 20), (30, 30), (50, 50))
    }
    assert thresholds == {(8, 7), (18, 20), (30, 30), (50, 50)}
    unrolling = preset("deq_xl_unrolling")
    assert (unrolling.gradient, unrolling.phantom_k, unrolling.phantom_lam) == (
        Gradient.PHANTOM,
        5,
        0.5,
    )
    assert preset("deq_xl_unrolling").model == "deq_xl"


def test_deq_large_preset_builds_the_table_7_model() -> None:
    model = build_model(preset("deq_large_exact_8_7"), (3, 32, 32), 10)
    params = sum(p.numel() for p in model.parameters())
    assert 10e6 < params < 12e6, params
    assert model.solver.threshold == 8  # type: ignore[union-attr]
    assert model.training_gradient.backward_solver.threshold == 7  # type: ignore[union-attr]
    schedule = jacobian_schedule(preset("deq_large_exact_8_7"))
    assert schedule is not None and (schedule.frequency, schedule.stop_epoch) == (0.02, 90)
    assert schedule.start_step == 16000 and schedule.regularization.weight == 0.4
    with pytest.raises(ValueError, match="3x32x32"):
        build_model(preset("deq_large_exact_8_7"), (1, 8, 8), 10)


def test_baseline_models_have_their_sizes() -> None:
    assert 11.0e6 < sum(p.numel() for p in create_model("resnet18").parameters()) < 11.3e6
    assert 46.0e6 < sum(p.numel() for p in create_model("wrn34_10").parameters()) < 46.3e6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": -1.0}, "lr must be > 0"),
        ({"eps": 0.0}, "eps must be in"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"jac_frequency": 1.5}, "jac_frequency"),
        ({"bf16": True, "device": Device.CPU}, "bf16 autocast is for CUDA only"),
        ({"tf32": True, "device": Device.CPU}, "tf32 is a CUDA"),
        ({"compile": True, "compile_mode": "reduce-overhead", "device": Device.CPU}, "CUDA graphs"),
        ({"compile_mode": "fast"}, "compile_mode must be one of"),
        ({"compile_backend": "aot_eager"}, "apply only with compile=true"),
        ({"eval_batch_size": 0}, "eval_batch_size must be None or an int >= 1"),
        ({"model": "resnet18"}, "resnet18 is not a DEQ"),
        ({"gradient": Gradient.AUTOGRAD}, "Jacobian regularisation is DEQ-only"),
        ({"dropout": 0.1}, "dropout is a setting of small_conv_deq"),
        ({"data": "mnist.csv"}, "data must be 'cifar10', 'digits', 'memory'"),
        ({"dev_size": 0}, "dev_size"),
        ({"model": "resnet50"}, "unknown model 'resnet50': registered are"),
        ({"solver_tol": math.inf}, "solver_tol must be a finite number >= 0, got inf$"),
        (
            {"forward_solver": "newton"},
            "forward_solver: unknown solver 'newton'; choose one of anderson, broyden, fixed_point",
        ),
        ({"backward_solver": "anderson:window=5"}, "backward_solver: solver 'anderson' has no"),
        (
            {"forward_solver": "anderson:threshold=5"},
            r"forward_solver: the threshold is given twice \(in 'anderson:threshold=5' and as "
            r"threshold=8\)",
        ),
        ({"backward_solver": "anderson", "gradient": Gradient.PHANTOM}, "exact gradient's"),
    ],
)
def test_bad_settings_are_refused_with_their_name(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TrainConfig(), **changes)


def test_options_are_typed_and_enums_read_by_name_or_value() -> None:
    for gradient in ("phantom", "PHANTOM", "Phantom"):
        _, _, config = train_cli.resolve(["--preset", "cpu_exact", "--lr", "0.01",
                                          "--gradient", gradient, "--width", "null"])  # fmt: skip
        assert (config.lr, config.gradient, config.width) == (0.01, Gradient.PHANTOM, None)
    with pytest.raises(CommandError, match="unrecognized arguments: --learning_rate"):
        train_cli.resolve(["--preset", "cpu_exact", "--learning_rate", "0.1"])
    with pytest.raises(CommandError, match='key "lr".*Got value: fast'):
        train_cli.resolve(["--preset", "cpu_exact", "--lr", "fast"])
    with pytest.raises(CommandError, match="expected one of EXACT, PHANTOM, AUTOGRAD"):
        train_cli.resolve(["--preset", "cpu_exact", "--gradient", "implicit"])


def test_config_json_round_trip_and_differences() -> None:
    config = preset("deq_large_unrolling")
    again = TrainConfig.from_json(json.loads(json.dumps(to_jsonable(config))))
    assert again == config
    other = dataclasses.replace(config, lr=2e-3, threads=4)
    assert config.differences(other) == ["lr: 0.001 -> 0.002"]  # threads is run-only
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_json({"learning_rate": 1})


def test_solvers_by_name_with_the_config_thresholds(tmp_path: Path) -> None:
    """The forward and backward solvers come from the registry, with forward_threshold,
    backward_threshold and solver_tol; Broyden by default, also for a run folder's config.json
    written before the solver fields existed; the command line takes them as text."""
    old = to_jsonable(preset("cpu_exact"))
    del old["forward_solver"], old["backward_solver"]
    assert TrainConfig.from_json(old) == preset("cpu_exact")
    model = build_model(preset("cpu_exact"), (1, 8, 8), 10)
    assert isinstance(model, DEQ) and isinstance(model.training_gradient, ImplicitGradient)
    assert model.solver == Broyden(threshold=8, tol=1e-3)
    assert model.training_gradient.backward_solver == Broyden(threshold=7, tol=1e-3)
    _, _, config = train_cli.resolve(
        ["--preset", "cpu_exact", "--forward_solver", "anderson:memory=3",
         "--backward_solver", "fixed_point:damping=0.5", "--backward_threshold", "12"]
    )  # fmt: skip
    model = build_model(config, (1, 8, 8), 10)
    assert isinstance(model, DEQ) and isinstance(model.training_gradient, ImplicitGradient)
    assert model.solver == Anderson(threshold=8, tol=1e-3, memory=3)
    assert model.training_gradient.backward_solver == FixedPointIteration(12, 1e-3, damping=0.5)
    with pytest.raises(CommandError, match="forward_solver: unknown solver 'newton'"):
        train_cli.resolve(["--preset", "cpu_exact", "--forward_solver", "newton"])


def test_the_fingerprint_names_what_a_run_computes() -> None:
    config = preset("cpu_exact")
    fingerprint = config.fingerprint()
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    again = TrainConfig.from_json(json.loads(json.dumps(to_jsonable(config))))
    assert again.fingerprint() == fingerprint  # as config.json reads back
    run_only = dataclasses.replace(
        config, threads=3, num_workers=0, data_root=Path("elsewhere"), download=False, plots=False
    )
    assert run_only.fingerprint() == fingerprint  # how it runs, not what it computes
    assert dataclasses.replace(config, jac_weight=1.2).fingerprint() != fingerprint
    assert preset("cpu_unrolling").fingerprint() != fingerprint
    # the solver fields came later: at their default they leave the fingerprint as it was,
    # so that runs cached before them are found again; another solver is another run
    later = {"forward_solver", "backward_solver", "norm", "random_state", "adversary"}
    values = {k: v for k, v in to_jsonable(config).items()
              if k not in RUN_ONLY_KEYS | later}  # fmt: skip
    before = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
    assert fingerprint == before
    assert dataclasses.replace(config, forward_solver="anderson").fingerprint() != fingerprint
    assert dataclasses.replace(config, norm="L2").fingerprint() != fingerprint
    assert dataclasses.replace(config, random_state=True).fingerprint() != fingerprint
    assert dataclasses.replace(config, adversary="art").fingerprint() != fingerprint


def test_cli_resolves_preset_file_and_options(tmp_path: Path, capsys) -> None:
    """Preset (defaults) < config file < options, whatever their order on the command line."""
    assert "train" in SUBCOMMANDS
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"epochs": 3, "eps": 0.2, "lr": 0.002}))
    for argv in (
        ["--preset", "cpu_unrolling", "--config", str(settings), "--eps", "0.15", "--lr", "5e-3"],
        ["--eps", "0.15", "--config", str(settings), "--lr", "5e-3", "--preset", "cpu_unrolling"],
    ):
        _, args, config = train_cli.resolve(argv)
        expected = (3, 0.2 if argv[0] == "--eps" else 0.15, 0.005)  # a file after an option wins
        assert (config.epochs, config.eps, config.lr) == expected
        assert config.gradient is Gradient.PHANTOM and config.width == 32  # the preset's
        assert train_cli.run_folder(args) == Path("runs/cpu_unrolling")

    assert train_cli.main(["--preset", "cpu_exact", "--bogus", "1"]) == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    assert train_cli.main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert train_cli.main(["--preset", "cpu_exact", "--bf16", "true"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "deq-attacks train: invalid training config: bf16 autocast is for CUDA only; on CPU "
        "run in float32 (drop bf16)\n"
    )
    assert train_cli.main(["--lr", "0.1"]) == 2
    assert "give --preset NAME (or --config FILE)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_cli.main(["--preset", "deq_large_unrolling", "--out-dir", str(tmp_path)]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
    # --print_config: the resolved settings as YAML, enums by name; read back as the same config
    assert train_cli.main(["--preset", "cpu_exact", "--gradient", "phantom", "--print_config"]) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert (values["model"], values["gradient"], values["preset"]) == ("small_conv_deq", "PHANTOM",
                                                                         "cpu_exact")  # fmt: skip
    (tmp_path / "printed.yaml").write_text(printed)
    _, _, again = train_cli.resolve(["--config", str(tmp_path / "printed.yaml")])
    assert again == dataclasses.replace(preset("cpu_exact"), gradient=Gradient.PHANTOM)
    # a run's config.json (enums by value) is a config file too
    (tmp_path / "config.json").write_text(json.dumps(to_jsonable(preset("cpu_unrolling"))))
    _, args, again = train_cli.resolve(["--config", str(tmp_path / "config.json")])
    assert again == preset("cpu_unrolling") and train_cli.run_folder(args) == Path("runs/config")
    assert train_cli.main(["--preset", "cpu_exact", "--epochs", "many"]) == 2
    assert 'key "epochs"' in capsys.readouterr().err


def test_help_texts_come_from_the_field_docstrings(capsys) -> None:
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--phantom_lam PHANTOM_LAM, --phantom-lam PHANTOM_LAM Damping lambda of the phantom "
        "gradient." in text
    )
    assert "--gradient {EXACT,PHANTOM,AUTOGRAD}" in text
    compile_mode = text.rsplit("--compile_mode COMPILE_MODE", 1)[1].split("--compile_backend")[0]
    assert all(mode in compile_mode.replace("- ", "-") for mode in COMPILE_MODES)  # (wrapped)


def test_acceleration_fields_and_device_defaults() -> None:
    """The acceleration options travel as one frozen Acceleration; the dev batch defaults to
    200 on CPU and 500 on CUDA unless set; the demo preset is the README's recipe."""
    cpu = preset("cpu_exact")
    assert not cpu.acceleration.active
    fast = dataclasses.replace(
        TrainConfig(),  # device cuda
        compile=True,
        compile_mode="reduce-overhead",
        channels_last=True,
        tf32=True,
        bf16=True,
    )
    accel = fast.acceleration
    assert (accel.compile, accel.compile_mode, accel.channels_last, accel.tf32, accel.bf16) == (
        True,
        "reduce-overhead",
        True,
        True,
        True,
    )
    assert TrainConfig().dev_batch_size == 500
    assert dataclasses.replace(TrainConfig(), device=Device.CPU).dev_batch_size == 200
    assert dataclasses.replace(TrainConfig(), eval_batch_size=64).dev_batch_size == 64
    demo = preset("demo")
    assert (demo.model, demo.width, demo.gradient, demo.phantom_k, demo.phantom_lam) == (
        "small_conv_deq",
        16,
        Gradient.PHANTOM,
        5,
        0.5,
    )
    assert (demo.data, demo.eps, demo.step, demo.steps, demo.adversarial) == (
        "digits",
        0.1,
        0.025,
        10,
        True,
    )
    assert 0 < demo.pretrain_steps < demo.epochs * (1100 // demo.batch_size)
