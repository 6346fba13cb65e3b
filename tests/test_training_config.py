"""TrainConfig, the presets and the ``train`` command line: every setting validated before any
work (each section itself, all problems at once), presets carrying the paper's recipe (Table 7,
10), the run folder's config record."""

from __future__ import annotations

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
from deq_attacks.interfaces.inputs import check_model_fits
from deq_attacks.model_spec import ModelSpec
from deq_attacks.models import create_model
from deq_attacks.records import to_jsonable
from deq_attacks.solvers import Anderson, Broyden, FixedPointIteration
from deq_attacks.training import PRESETS, TrainConfig, preset
from deq_attacks.training.build import jacobian_schedule, training_model
from deq_attacks.training.config import Device, Gradient, OptimiserSettings
from tests.training_fixtures import PAPER_PRESETS


def test_paper_presets_carry_table_7() -> None:
    assert set(PAPER_PRESETS) <= set(PRESETS)
    for name in PAPER_PRESETS:
        c = preset(name)
        o, t, d = c.optimiser, c.threat, c.data
        assert (o.batch_size, o.lr, o.epochs, c.execution.device) == (96, 1e-3, 150, Device.CUDA)
        assert (t.eps, t.step, t.steps, t.random_start) == (8 / 255, 2 / 255, 10, True)
        assert (d.source, d.crop_padding, d.flip) == ("cifar10", 4, True)
        if c.is_deq:
            assert o.pretrain_steps == 16000 and o.pretrain_depth == 8
            assert (o.jac_weight, o.jac_frequency, o.jac_stop_epoch) == (0.4, 0.02, 90)
        else:  # baselines: no DEQ-only steps
            assert o.pretrain_steps == 0 and o.jac_weight == 0
    thresholds = {
        (preset(f"deq_large_exact_{f}_{b}").model.forward_threshold,
         preset(f"deq_large_exact_{f}_{b}").model.backward_threshold)
        for f, b in ((8, 7), (18, 20), (30, 30), (50, 50))
    }  # fmt: skip
    assert thresholds == {(8, 7), (18, 20), (30, 30), (50, 50)}
    unrolling = preset("deq_xl_unrolling").model
    assert (unrolling.training_gradient, unrolling.phantom_k, unrolling.phantom_lam) == (
        Gradient.PHANTOM,
        5,
        0.5,
    )
    assert unrolling.name == "deq_xl"


def test_deq_large_preset_builds_the_table_7_model() -> None:
    model = training_model(preset("deq_large_exact_8_7"), (3, 32, 32), 10)
    params = sum(p.numel() for p in model.parameters())
    assert 10e6 < params < 12e6, params
    assert model.solver.threshold == 8  # type: ignore[union-attr]
    assert model.training_gradient.backward_solver.threshold == 7  # type: ignore[union-attr]
    schedule = jacobian_schedule(preset("deq_large_exact_8_7"))
    assert schedule is not None and (schedule.frequency, schedule.stop_epoch) == (0.02, 90)
    assert schedule.start_step == 16000 and schedule.regularization.weight == 0.4
    # the one fit check refuses the digits for it, before any work
    with pytest.raises(ValueError, match=r"built for samples of shape \(3, 32, 32\)"):
        check_model_fits(model, torch.zeros(1, 1, 8, 8), torch.zeros(1), "digits", 10)


def test_baseline_models_have_their_sizes() -> None:
    assert 11.0e6 < sum(p.numel() for p in create_model("resnet18").parameters()) < 11.3e6
    assert 46.0e6 < sum(p.numel() for p in create_model("wrn34_10").parameters()) < 46.3e6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": -1.0}, "invalid optimiser settings: lr must be > 0"),
        ({"eps": 0.0}, "invalid threat settings: eps must be in"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"jac_frequency": 1.5}, "jac_frequency"),
        ({"bf16": True, "device": Device.CPU}, "bf16 autocast is for CUDA only"),
        ({"tf32": True, "device": Device.CPU}, "tf32 is a CUDA"),
        ({"compile": True, "compile_mode": "reduce-overhead", "device": Device.CPU}, "CUDA graphs"),
        ({"compile_mode": "fast"}, "compile_mode must be one of"),
        ({"compile_backend": "aot_eager"}, "apply only with compile=true"),
        ({"eval_batch_size": 0}, "eval_batch_size must be None or an int >= 1"),
        ({"name": "resnet18"}, "resnet18 is not a DEQ"),
        ({"training_gradient": Gradient.AUTOGRAD}, "deq_large is a DEQ: use training_gradient"),
        ({"source": "mnist.csv"}, "source must be 'cifar10', 'digits', 'memory'"),
        ({"dev_size": 0}, "invalid data settings: dev_size"),
        ({"name": "resnet50"}, "unknown model 'resnet50': registered are"),
        ({"solver_tol": math.inf}, "solver_tol must be null or a finite number >= 0, got inf$"),
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
        (
            {"backward_solver": "anderson", "training_gradient": Gradient.PHANTOM},
            "exact gradient's",
        ),
        ({"training_gradient": None}, "model.training_gradient must be given for training"),
    ],
)
def test_bad_settings_are_refused_with_their_name(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig().updated(**changes)


def test_each_section_validates_itself_and_all_problems_come_at_once() -> None:
    with pytest.raises(ValueError, match="invalid optimiser settings: epochs must be an int >= 1"):
        OptimiserSettings(epochs=0)
    with pytest.raises(ValueError, match="invalid model spec: phantom_k must be an int >= 1"):
        ModelSpec("small_conv_deq", phantom_k=0)
    values = to_jsonable(TrainConfig())
    values["optimiser"]["lr"] = -1.0
    values["optimiser"]["epochs"] = 0
    values["threat"]["steps"] = 0
    values["model"]["phantom_lam"] = 2.0
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_json(values)
    text = str(caught.value)
    for problem in ("epochs must be an int >= 1", "lr must be > 0", "steps must be an int >= 1",
                    "phantom_lam must be in (0, 1]"):  # fmt: skip
        assert problem in text
    with pytest.raises(CommandError) as caught:  # on the command line too
        train_cli.resolve(["--preset", "cpu_exact", "--optimiser.lr", "-1", "--threat.steps", "0"])
    assert "lr must be > 0" in str(caught.value) and "steps must be an int >= 1" in str(
        caught.value
    )


def test_options_are_typed_and_enums_read_by_name_or_value() -> None:
    for gradient in ("phantom", "PHANTOM", "Phantom"):
        _, _, config = train_cli.resolve(["--preset", "cpu_exact", "--optimiser.lr", "0.01",
                                          "--model.training_gradient", gradient,
                                          "--model.args.channels", "8"])  # fmt: skip
        assert (config.optimiser.lr, config.model.training_gradient) == (0.01, Gradient.PHANTOM)
        assert config.model.args == {"channels": 8, "dropout": 0.0}
    with pytest.raises(CommandError, match="unrecognized arguments: --optimiser.learning_rate"):
        train_cli.resolve(["--preset", "cpu_exact", "--optimiser.learning_rate", "0.1"])
    with pytest.raises(CommandError, match='key "optimiser.lr".*Got value: fast'):
        train_cli.resolve(["--preset", "cpu_exact", "--optimiser.lr", "fast"])
    with pytest.raises(CommandError, match="expected one of EXACT, PHANTOM, AUTOGRAD"):
        train_cli.resolve(["--preset", "cpu_exact", "--model.training_gradient", "implicit"])
    # the flat options of before the sections name their new spelling
    for old, new in (("--epochs", "--optimiser.epochs"),
                     ("--gradient", "--model.training_gradient"),
                     ("--forward-threshold", "--model.forward_threshold"),
                     ("--data", "--data.source")):  # fmt: skip
        with pytest.raises(CommandError, match=f"^{old} is now {new}"):
            train_cli.resolve(["--preset", "cpu_exact", old, "1"])


def test_config_json_round_trip_and_differences() -> None:
    config = preset("deq_large_unrolling")
    again = TrainConfig.from_json(json.loads(json.dumps(to_jsonable(config))))
    assert again == config
    other = config.updated(lr=2e-3, threads=4)
    assert config.differences(other) == ["optimiser.lr: 0.001 -> 0.002"]  # threads: run-only
    with pytest.raises(ValueError, match="unknown TrainConfig sections") as caught:
        TrainConfig.from_json({"learning_rate": 1})
    assert "flat config.json" not in str(caught.value)
    with pytest.raises(ValueError, match="flat config.json of a deq_attacks before the sections"):
        TrainConfig.from_json({"model": "small_conv_deq", "epochs": 3, "eps": 0.1})
    with pytest.raises(ValueError, match="unknown OptimiserSettings keys"):
        TrainConfig.from_json({"optimiser": {"learning_rate": 1}})


def test_solvers_by_name_with_the_config_thresholds() -> None:
    """The forward and backward solvers come from the registry, with forward_threshold,
    backward_threshold and solver_tol; the command line takes them as text."""
    model = training_model(preset("cpu_exact"), (1, 8, 8), 10)
    assert isinstance(model, DEQ) and isinstance(model.training_gradient, ImplicitGradient)
    assert model.solver == Broyden(threshold=8, tol=1e-3)
    assert model.training_gradient.backward_solver == Broyden(threshold=7, tol=1e-3)
    _, _, config = train_cli.resolve(
        ["--preset", "cpu_exact", "--model.forward_solver", "anderson:memory=3",
         "--model.backward_solver", "fixed_point:damping=0.5",
         "--model.backward_threshold", "12"]
    )  # fmt: skip
    model = training_model(config, (1, 8, 8), 10)
    assert isinstance(model, DEQ) and isinstance(model.training_gradient, ImplicitGradient)
    assert model.solver == Anderson(threshold=8, tol=1e-3, memory=3)
    assert model.training_gradient.backward_solver == FixedPointIteration(12, 1e-3, damping=0.5)
    with pytest.raises(CommandError, match="forward_solver: unknown solver 'newton'"):
        train_cli.resolve(["--preset", "cpu_exact", "--model.forward_solver", "newton"])


def test_the_fingerprint_names_what_a_run_computes() -> None:
    config = preset("cpu_exact")
    fingerprint = config.fingerprint()
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    again = TrainConfig.from_json(json.loads(json.dumps(to_jsonable(config))))
    assert again.fingerprint() == fingerprint  # as config.json reads back
    run_only = config.updated(
        threads=3, num_workers=0, data_root=Path("elsewhere"), download=False, plots=False
    )
    assert run_only.fingerprint() == fingerprint  # how it runs, not what it computes
    assert config.updated(jac_weight=1.2).fingerprint() != fingerprint
    assert preset("cpu_unrolling").fingerprint() != fingerprint
    assert config.updated(forward_solver="anderson").fingerprint() != fingerprint
    assert config.updated(norm="L2").fingerprint() != fingerprint
    assert config.updated(random_state=True).fingerprint() != fingerprint
    assert config.updated(args={"channels": 8}).fingerprint() != fingerprint
    assert config.updated(adversary="art").fingerprint() != fingerprint


def test_cli_resolves_preset_file_and_options(tmp_path: Path, capsys) -> None:
    """Preset (defaults) < config file < options, whatever their order on the command line."""
    assert "train" in SUBCOMMANDS
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps({"optimiser": {"epochs": 3, "lr": 0.002}, "threat": {"eps": 0.2}})
    )
    for argv in (
        ["--preset", "cpu_unrolling", "--config", str(settings), "--threat.eps", "0.15",
         "--optimiser.lr", "5e-3"],
        ["--threat.eps", "0.15", "--config", str(settings), "--optimiser.lr", "5e-3",
         "--preset", "cpu_unrolling"],
    ):  # fmt: skip
        _, args, config = train_cli.resolve(argv)
        expected = (3, 0.2 if argv[0] == "--threat.eps" else 0.15, 0.005)  # a later file wins
        assert (config.optimiser.epochs, config.threat.eps, config.optimiser.lr) == expected
        assert config.model.training_gradient is Gradient.PHANTOM  # the preset's
        assert config.model.args == {"channels": 32, "dropout": 0.0}
        assert train_cli.run_folder(args) == Path("runs/cpu_unrolling")

    assert train_cli.main(["--preset", "cpu_exact", "--bogus", "1"]) == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    assert train_cli.main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert train_cli.main(["--preset", "cpu_exact", "--execution.bf16", "true"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "deq-attacks train: invalid training config: bf16 autocast is for CUDA only; on CPU "
        "run in float32 (drop bf16)\n"
    )
    assert train_cli.main(["--optimiser.lr", "0.1"]) == 2
    assert "give --preset NAME (or --config FILE)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_cli.main(["--preset", "deq_large_unrolling", "--out-dir", str(tmp_path)]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
    # --print_config: the resolved settings as YAML, enums by name; read back as the same config
    argv = ["--preset", "cpu_exact", "--model.training_gradient", "phantom", "--print_config"]
    assert train_cli.main(argv) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert (values["model"]["name"], values["model"]["training_gradient"], values["preset"]) == (
        "small_conv_deq", "PHANTOM", "cpu_exact")  # fmt: skip
    (tmp_path / "printed.yaml").write_text(printed)
    _, _, again = train_cli.resolve(["--config", str(tmp_path / "printed.yaml")])
    assert again == preset("cpu_exact").updated(training_gradient=Gradient.PHANTOM)
    # a run's config.json (enums by value) is a config file too
    (tmp_path / "config.json").write_text(json.dumps(to_jsonable(preset("cpu_unrolling"))))
    _, args, again = train_cli.resolve(["--config", str(tmp_path / "config.json")])
    assert again == preset("cpu_unrolling") and train_cli.run_folder(args) == Path("runs/config")
    assert train_cli.main(["--preset", "cpu_exact", "--optimiser.epochs", "many"]) == 2
    assert 'key "optimiser.epochs"' in capsys.readouterr().err


def test_help_texts_come_from_the_field_docstrings(capsys) -> None:
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--model.phantom_lam PHANTOM_LAM, --model.phantom-lam PHANTOM_LAM Damping lambda of the "
        "PHANTOM gradient." in text
    )
    assert "--model.training_gradient {EXACT,PHANTOM,AUTOGRAD,null}" in text
    compile_mode = text.rsplit("--execution.compile_mode COMPILE_MODE", 1)[1].split(
        "--execution.compile_backend"
    )[0]
    assert all(mode in compile_mode.replace("- ", "-") for mode in COMPILE_MODES)  # (wrapped)


def test_acceleration_fields_and_device_defaults() -> None:
    """The acceleration options travel as one frozen Acceleration; the dev batch defaults to
    200 on CPU and 500 on CUDA unless set; the demo preset is the README's recipe."""
    cpu = preset("cpu_exact")
    assert not cpu.execution.acceleration.active
    fast = TrainConfig().updated(  # device cuda
        compile=True, compile_mode="reduce-overhead", channels_last=True, tf32=True, bf16=True
    )
    accel = fast.execution.acceleration
    assert (accel.compile, accel.compile_mode, accel.channels_last, accel.tf32, accel.bf16) == (
        True,
        "reduce-overhead",
        True,
        True,
        True,
    )
    assert TrainConfig().execution.dev_batch_size == 500
    assert TrainConfig().updated(device=Device.CPU).execution.dev_batch_size == 200
    assert TrainConfig().updated(eval_batch_size=64).execution.dev_batch_size == 64
    demo = preset("demo")
    model = demo.model
    assert (
        model.name,
        model.args,
        model.training_gradient,
        model.phantom_k,
        model.phantom_lam,
    ) == (
        "small_conv_deq",
        {"channels": 16, "dropout": 0.0},
        Gradient.PHANTOM,
        5,
        0.5,
    )
    t = demo.threat
    assert (demo.data.source, t.eps, t.step, t.steps, t.adversarial) == (
        "digits",
        0.1,
        0.025,
        10,
        True,
    )
    o = demo.optimiser
    assert 0 < o.pretrain_steps < o.epochs * (1100 // o.batch_size)
