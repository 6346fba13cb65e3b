"""``deq-attacks evaluate`` with a user's own DEQ: a builder imported from the working
directory, the builder contract, solvers never swapped silently, the checkpoints people have,
the split the user chooses, and clear refusals (exit code 2, one line on stderr) before work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from deq_attacks import Anderson, Broyden, ImplicitGradient, PhantomGradient
from deq_attacks.cli import main, working_directory_on_path
from deq_attacks.cli import train as train_cli
from deq_attacks.cli.evaluate import build_parser, resolve
from deq_attacks.cli.options import settings
from deq_attacks.evaluation import Mode
from deq_attacks.model_spec import BuiltModel, ModelSpec, build_model
from deq_attacks.models.registry import resolve_builder

#: The smallest protocol: one PGD step, tiny AutoAttack and Square, a one-candidate sweep.
TINY = ["--steps", "1",
        "--attacks", "pgd,autoattack:iterations=1,queries=3,target_classes=2,square:queries=3",
        "--long_steps", "2", "--batch_size", "8",
        "--diagnostic_samples", "2", "--sweep", "adjoint.n=1", "--sweep", "adjoint.beta=1.0",
        "--sweep", "unrolled.n=1", "--sweep", "unrolled.k=1", "--sweep", "unrolled.lam=1.0",
        "--eps", "0.1", "--step", "0.05", "--mode", "table"]  # fmt: skip

#: A user's torchdeq model, as they wrote it: their own names (encoder, layer, head), torchdeq's
#: weight norm, a core with Anderson. ``build`` loads a checkpoint into it before adapting it;
#: ``build_plain`` takes no checkpoint (the CLI then loads into the adapted DEQ).
USER_MODULE = '''
import torch
import torchdeq
from torch import nn
from torchdeq.norm import apply_norm

from deq_attacks.adapters.torchdeq import from_torchdeq
from deq_attacks.checkpoints import load_weights
from deq_attacks.deq import DEQ

CHANNELS = 4


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


class TorchDEQNet(nn.Module):
    def __init__(self, f_solver="anderson"):
        super().__init__()
        self.encoder = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.layer = Layer()
        apply_norm(self.layer, "weight_norm")
        with torch.no_grad():
            self.layer.conv.weight_g.mul_(0.4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 64, 10))
        self.deq = torchdeq.get_deq(f_solver=f_solver, f_max_iter=6, f_tol=1e-4)


def build(checkpoint=None, **deq_kwargs):
    net = TorchDEQNet()
    if checkpoint is not None:
        load_weights(net, checkpoint)
    return from_torchdeq(net.layer, net.encoder, net.head, net.deq, input_shape=(1, 8, 8),
                         **deq_kwargs)


def build_fixed_point(checkpoint=None, **deq_kwargs):
    net = TorchDEQNet(f_solver="fixed_point_iter")
    if checkpoint is not None:
        load_weights(net, checkpoint)
    return from_torchdeq(net.layer, net.encoder, net.head, net.deq, input_shape=(1, 8, 8),
                         **deq_kwargs)


def build_plain(**deq_kwargs):
    net = TorchDEQNet()
    return from_torchdeq(net.layer, net.encoder, net.head, net.deq, input_shape=(1, 8, 8),
                         **deq_kwargs)


def build_fixed(hidden=8):
    """No **kwargs: takes neither solver= nor training_gradient=."""
    return build_plain()


def build_ignoring(**kwargs):
    """Takes **kwargs but ignores them."""
    return build_plain()


def not_a_deq(**kwargs):
    return nn.Linear(2, 2)


def broken(**kwargs):
    raise RuntimeError("my builder is broken")


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A working directory holding the user's module (a fresh name per test), not on
    ``sys.path``: as for the ``deq-attacks`` console script, whose ``sys.path[0]`` is its bin
    folder."""
    name = f"userdeq_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.chdir(tmp_path)
    yield tmp_path, name
    sys.modules.pop(name, None)


def _user_net(module: str):
    return sys.modules[module].TorchDEQNet()


def _build(*argv: str) -> BuiltModel:
    """``build_model`` on parsed options, with the working directory importable as in main."""
    with working_directory_on_path():
        return build_model(settings(ModelSpec, build_parser().parse_args(list(argv)).model))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``deq-attacks evaluate argv``; assert exit code 2; return stderr."""
    assert main(["evaluate", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("deq-attacks evaluate: ") and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1  # one line
    return captured.err


# --- the builder imported from the working directory ---------------------------------------


def test_entry_point_is_imported_from_the_working_directory(user_dir, capsys) -> None:
    _, name = user_dir
    with pytest.raises(ValueError, match="cannot import"):
        resolve_builder(f"{name}:build")  # not on sys.path by itself
    err = _refused(["--model.name", f"{name}:build_fixed", "--model.args.bogus", "1"], capsys)
    assert f"the builder of model {name}:build_fixed takes no bogus=" in err  # imported: its
    assert "(it accepts: hidden)" in err  # signature was read
    assert sys.path[0] != str(user_dir[0])  # and the working directory left sys.path again


def _entry_point_argv(command: str, model: str) -> list[str]:
    """``command`` (evaluate, train, demo) asked for the model entry point ``model``."""
    if command == "evaluate":
        return ["evaluate", "--model.name", model, "--model.training-gradient", "exact"]
    if command == "train":
        return ["train", "--preset", "cpu_unrolling", "--model.name", model, "--model.args", "{}"]
    return ["demo", "--native_kernels", "true", "--train.model.name", model,
            "--train.model.args", "{}"]  # fmt: skip


@pytest.mark.parametrize("command", ["train", "demo"])
def test_train_and_demo_import_the_model_from_the_working_directory(
    user_dir, capsys, command: str
) -> None:
    _, name = user_dir
    assert main(_entry_point_argv(command, f"{name}:NOT_CALLABLE")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deq-attacks {command}: ") and err.count("\n") == 1
    assert f"{name}.NOT_CALLABLE is a int, not callable" in err  # imported: its attribute read
    assert sys.path[0] != str(user_dir[0])  # and the working directory left sys.path again


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "model", "message"),
    [
        ("evaluate", "build_fixed", "takes no training_gradient="),
        ("train", "NOT_CALLABLE", "is a int, not callable"),
        ("demo", "NOT_CALLABLE", "is a int, not callable"),
    ],
)
def test_console_script_imports_from_the_working_directory(
    user_dir, command: str, model: str, message: str
) -> None:
    """The real situation: a console script, whose sys.path[0] is its own folder."""
    directory, name = user_dir
    script = directory / "bin" / "deq-attacks"
    script.parent.mkdir()
    script.write_text("import sys\nfrom deq_attacks.cli import main\nsys.exit(main())\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, str(script), *_entry_point_argv(command, f"{name}:{model}")],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"deq-attacks {command}: ")
    assert message in result.stderr  # got past the import
    assert "cannot import" not in result.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
        ("{name}:absent", "has no attribute 'absent'"),
        ("{name}:NOT_CALLABLE", "is a int, not callable"),
        ("{name}:not_a_deq", "built a Linear, not a deq_attacks DEQ"),
        ("{name}:broken", "the builder raised RuntimeError: my builder is broken"),
        ("no_such_model", "unknown model 'no_such_model'"),
    ],
)
def test_bad_entry_points_are_named(user_dir, capsys, model: str, message: str) -> None:
    _, name = user_dir
    assert message in _refused(["--model.name", model.format(name=name)], capsys)


# --- the builder contract and the solver ----------------------------------------------------


def test_options_reach_a_builder_only_if_it_takes_them(user_dir, capsys) -> None:
    _, name = user_dir
    err = _refused(
        ["--model.name", f"{name}:build_fixed", "--model.training-gradient", "phantom"], capsys
    )
    assert "training_gradient: the builder" in err and "(it accepts: hidden)" in err
    err = _refused(["--model.name", f"{name}:build_fixed", "--model.args.width", "3"], capsys)
    assert "model.args.width: the builder" in err
    err = _refused(
        ["--model.name", f"{name}:build_ignoring", "--model.forward_solver", "broyden:threshold=3"],
        capsys,
    )
    assert "took solver=Broyden(threshold=3) but its model solves with Anderson" in err
    err = _refused(
        ["--model.name", f"{name}:build_ignoring", "--model.training-gradient", "phantom"], capsys
    )
    assert "took training_gradient=PhantomGradient" in err
    err = _refused(["--model.name", f"{name}:build", "--model.forward_solver", "newton"], capsys)
    assert "unknown solver 'newton'; choose one of" in err and "anderson" in err
    err = _refused(
        [
            "--model.name",
            f"{name}:build",
            "--model.forward_solver",
            "anderson:threshold=4",
            "--model.forward_threshold",
            "5",
        ],
        capsys,
    )
    assert "the threshold is given twice" in err


def test_threshold_keeps_the_models_own_solver(user_dir) -> None:
    _, name = user_dir
    built = _build("--model.name", f"{name}:build", "--model.forward_threshold", "5")
    assert built.model.solver == Anderson(threshold=5, tol=1e-4, stop_mode="abs", memory=6)
    assert built.record["solver_spec"]["solver"] == "anderson"
    assert built.record["solver_choice"] == (
        "the model's own solver with forward_threshold 5, solver_tol 0.0001"
    )
    own = _build("--model.name", f"{name}:build")
    assert own.model.solver == Anderson(threshold=6, tol=1e-4, stop_mode="abs", memory=6)
    assert own.record["solver_choice"] == "the model's own solver"


def test_solver_replaces_only_when_asked_and_says_so(user_dir) -> None:
    _, name = user_dir
    passed = _build(
        "--model.name", f"{name}:build", "--model.forward_solver", "broyden:threshold=7"
    )
    assert passed.model.solver == Broyden(threshold=7)
    assert passed.record["solver_choice"] == (
        "forward_solver broyden:threshold=7, passed to the builder"
    )
    applied = _build(
        "--model.name",
        f"{name}:build_fixed",
        "--model.forward_solver",
        "fixed_point",
        "--model.forward_threshold",
        "9",
    )
    assert applied.model.solver.threshold == 9
    assert type(applied.model.solver).__name__ == "FixedPointIteration"
    assert (
        "the builder takes no solver=, so it replaced the built model's Anderson"
        in (applied.notes[0])
    )
    gradient = _build(
        "--model.name",
        f"{name}:build",
        "--model.training-gradient",
        "exact",
        "--model.forward_threshold",
        "5",
    )
    assert gradient.model.training_gradient == ImplicitGradient(Broyden(threshold=4, tol=1e-4))
    phantom = _build("--model.name", f"{name}:build", "--model.training-gradient", "phantom")
    assert phantom.model.training_gradient == PhantomGradient(5, 0.5)


def test_the_exact_gradients_backward_solver_comes_from_the_registry(user_dir, capsys) -> None:
    _, name = user_dir
    built = _build(
        "--model.name", f"{name}:build", "--model.training-gradient", "exact",
        "--model.forward_threshold", "5", "--model.backward-solver", "anderson:memory=3",
    )  # fmt: skip
    expected = Anderson(threshold=4, tol=1e-4, memory=3)
    assert built.model.training_gradient == ImplicitGradient(expected)
    err = _refused(["--model.name", f"{name}:build", "--model.backward-solver", "anderson"], capsys)
    assert "backward_solver is the exact gradient's: give training_gradient exact" in err
    argv = ["--model.name", f"{name}:build", "--model.training-gradient", "exact"]
    err = _refused([*argv, "--model.backward-solver", "anderson:threshold=3"], capsys)
    assert "the threshold is given twice" in err
    err = _refused([*argv, "--model.backward-solver", "newton"], capsys)
    assert "unknown solver 'newton'; choose one of anderson, broyden, fixed_point" in err


# --- checkpoints ----------------------------------------------------------------------------


def test_builder_loads_a_pt_checkpoint_into_its_own_module(user_dir) -> None:
    directory, name = user_dir
    _build("--model.name", f"{name}:build")  # imports the user's module
    net = _user_net(name)
    path = directory / "trained.pt"
    torch.save({"epoch": 4, "state_dict": net.state_dict()}, path)
    built = _build("--model.name", f"{name}:build", "--model.checkpoint", str(path))
    assert torch.equal(built.model.f.conv.weight_v, net.layer.conv.weight_v)
    assert torch.equal(built.model.injection.weight, net.encoder.weight)
    assert built.record["checkpoint"]["loaded_by"] == "builder"


def test_key_map_loads_a_users_checkpoint_into_the_adapted_deq(user_dir, capsys) -> None:
    directory, name = user_dir
    _build("--model.name", f"{name}:build_plain")
    net = _user_net(name)
    path = directory / "trained.pth"
    torch.save(net.state_dict(), path)
    err = _refused(["--model.name", f"{name}:build_plain", "--model.checkpoint", str(path)], capsys)
    assert "does not fit the model" in err and "--model.key_map" in err
    built = _build(
        "--model.name",
        f"{name}:build_plain",
        "--model.checkpoint",
        str(path),
        "--model.key_map+",
        "encoder.=injection.",
        "--model.key_map+",
        "layer.=f.",
    )
    assert torch.equal(built.model.f.conv.weight_g, net.layer.conv.weight_g)
    assert "key map encoder.=injection. (2 keys), layer.=f. (3 keys)" in built.notes[-1]
    err = _refused(
        [
            "--model.name",
            f"{name}:build",
            "--model.checkpoint",
            str(path),
            "--model.key_map+",
            "a.=b.",
        ],
        capsys,
    )
    assert "takes checkpoint= and loads the file itself" in err
    assert "give checkpoint too" in _refused(
        ["--model.name", f"{name}:build_plain", "--model.key_map+", "a.=b."], capsys
    )


def test_a_checkpoint_that_does_not_fit_or_cannot_be_read_is_one_line(user_dir, capsys) -> None:
    directory, name = user_dir
    corrupt = directory / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    err = _refused(
        ["--model.name", f"{name}:build_plain", "--model.checkpoint", str(corrupt)], capsys
    )
    assert "corrupt or truncated torch.save file" in err
    small = directory / "small.pt"
    torch.save({"head.1.weight": torch.zeros(3, 3)}, small)
    err = _refused(["--model.name", f"{name}:build", "--model.checkpoint", str(small)], capsys)
    assert "the builder raised CheckpointMismatchError" in err and "does not fit" in err
    err = _refused(
        ["--model.name", f"{name}:build", "--model.checkpoint", str(directory / "no.pt")], capsys
    )
    assert "no.pt: no such file" in err


# --- data that does not fit, counts and ranges ----------------------------------------------


def test_data_the_model_was_not_built_for_is_refused(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    mnist_like = tmp_path / "mnist_like.npz"
    np.savez(mnist_like, x=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), y=np.arange(40) % 10)
    common = ["--data", str(mnist_like), "--n-dev", "2", "--n-test", "2"]
    err = _refused(
        ["--model.name", "small_conv_deq", "--model.args.image_size", "8", *common], capsys
    )
    assert "built for samples of shape (1, 8, 8) (its input_shape), but mnist_like has " in err
    err = _refused(
        [
            "--model.name",
            "mlp_deq",
            "--model.args.in_features",
            "64",
            "--model.args.num_classes",
            "10",
            *common,
        ],
        capsys,
    )
    assert "the model does not take the images of mnist_like (shape (1, 28, 28))" in err
    err = _refused(
        [
            "--model.name",
            "mlp_deq",
            "--model.args.in_features",
            "64",
            "--model.args.num_classes",
            "5",
        ],
        capsys,
    )
    assert "expected logits (1, 10) for its 10 classes" in err
    column = tmp_path / "column.npz"
    np.savez(column, x=np.zeros((4, 8, 8), np.uint8), y=np.zeros((4, 1), np.int64))
    err = _refused(["--model.name", "small_conv_deq", "--data", str(column)], capsys)
    assert "labels must be class indices of shape (N,), got (4, 1)" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--n-test", "0"], "the number of test images must be at least 1, got 0"),
        (["--n-dev", "600"], "600 development images asked, but only 597 held-out"),
        (["--test-range", "1700:1900"], "reaches past the 1797 images"),
        (["--dev-range", "1200:1300", "--test-range", "1250:1350"], "share 50 images"),
        (["--dev-range", "0:10", "--n-dev", "10"], "as indices or as a count, not both"),
        (["--data", "nowhere.npz"], "not 'digits', 'cifar10:ROOT' or an arrays file"),
    ],
)
def test_split_options_are_checked_before_work(capsys, options, message) -> None:
    assert message in _refused(["--model.name", "small_conv_deq", *options], capsys)


def test_a_missing_or_broken_config_file_is_one_line(tmp_path: Path, capsys) -> None:
    for main_of in (train_cli.main, lambda argv: main(["evaluate", "--model.name", "m", *argv])):
        assert main_of(["--config", str(tmp_path / "absent.json")]) == 2
        err = capsys.readouterr().err
        assert 'key "config"' in err and "absent.json" in err and "does not exist" in err
        broken = tmp_path / "broken.json"
        broken.write_text("{not json")
        assert main_of(["--config", str(broken)]) == 2
        err = capsys.readouterr().err
        assert "Problems parsing config" in err and "Traceback" not in err
        assert err.count("\n") == 1


# --- end to end -----------------------------------------------------------------------------


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["settings"]["fingerprint"]


def test_key_mapped_torchdeq_checkpoint_with_another_solver_runs_to_the_end(
    user_dir, capsys
) -> None:
    directory, name = user_dir
    _build("--model.name", f"{name}:build_plain")
    path = directory / "trained.pt"
    torch.save({"model": _user_net(name).state_dict()}, path)
    out = directory / "out"
    code = main(
        [
            "evaluate",
            "--model.name",
            f"{name}:build_plain",
            "--model.checkpoint",
            str(path),
            "--model.key_map+",
            "encoder.=injection.",
            "--model.key_map+",
            "layer.=f.",
            "--model.forward_solver",
            "broyden:threshold=3",
            "--model.training-gradient",
            "phantom",
            "--dev-range",
            "1300:1304",
            "--test-range",
            "1500:1504",
            *TINY,
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "development 1300:1304 (4 images), test 1500:1504 (4 images)" in printed
    description = _results(out)["description"]
    assert description["solver_spec"]["solver"] == "broyden"
    assert description["solver_spec"]["threshold"] == 3
    assert description["checkpoint"]["read"].endswith(
        "(torch, entry 'model', key map encoder.=injection. (2 keys), layer.=f. (3 keys)): "
        "7 tensors"
    )
    assert description["split"]["test"] == "1500:1504"
    assert description["input_shape"] == [1, 8, 8]


@pytest.mark.parametrize(
    ("builder", "solver", "solver_class"),
    [
        ("build", "anderson", "Anderson"),
        ("build_fixed_point", "fixed_point", "FixedPointIteration"),
    ],
)
def test_torchdeq_model_from_a_pt_checkpoint_runs_to_the_end(
    user_dir, builder: str, solver: str, solver_class: str
) -> None:
    """A torchdeq DEQ with an Anderson or a fixed-point solver goes through the whole
    protocol (sweep, PGD, AutoAttack, Square, BPTT, diagnostics) from a ``.pt`` checkpoint."""
    directory, name = user_dir
    _build("--model.name", f"{name}:{builder}")
    path = directory / "trained.pt"
    torch.save({"state_dict": _user_net(name).state_dict()}, path)
    out = directory / "out"
    code = main(
        [
            "evaluate",
            "--model.name",
            f"{name}:{builder}",
            "--model.checkpoint",
            str(path),
            "--n-dev",
            "4",
            "--n-test",
            "4",
            *TINY,
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    # every column ran against every defense, BPTT and AutoAttack included
    assert {"ready-made PGD", "exact AA", "adjoint z_1 PGD", "unrolled z_1 AA", "bptt AA",
            "square"} <= set(results["columns"])  # fmt: skip
    for defense in ("final", "early", "ensemble"):
        assert set(results["column_accuracy"][defense]) == set(results["columns"])
    description = _results(out)["description"]
    assert description["solver_spec"]["solver"] == solver
    assert description["solver_choice"] == "the model's own solver"
    plans = results["settings"]["sweep_plan"]
    adjoint = next(p for p in plans if p["family"] == "adjoint")
    assert adjoint["runs"] and adjoint["fixed"] == {"inverse": "negative_identity"}
    assert solver_class in adjoint["reason"]


def test_preset_sets_the_budgets_and_a_file_and_options_override_it(tmp_path: Path, capsys) -> None:
    _, _, config = resolve(["--model.name", "m", "--preset", "mnist"])
    assert (config.eps, config.step, config.steps, config.attack_specs[1].iterations) == (
        0.3, 0.01, 40, 100
    )
    # the order does not matter: the preset sets defaults, an option a value
    for argv in (["--preset", "mnist", "--eps", "0.2", "--steps", "7"],
                 ["--eps", "0.2", "--steps", "7", "--preset", "mnist"]):  # fmt: skip
        _, _, config = resolve(["--model.name", "m", *argv])
        assert (config.eps, config.step, config.steps) == (0.2, 0.01, 7)
    _, _, plain = resolve(["--model.name", "m"])
    assert (plain.eps, plain.steps, plain.mode) == (8 / 255, 10, Mode.VERDICT)
    # a config file (YAML) over the preset, an option over the file; enums by name or value
    settings = tmp_path / "evaluation.yaml"
    settings.write_text("preset: mnist\nsteps: 12\nmode: cascade\nsweep: [unrolled.k=1]\n")
    _, args, config = resolve(["--model.name", "m", "--config", str(settings), "--step", "0.02"])
    assert (config.eps, config.step, config.steps, config.mode) == (0.3, 0.02, 12, Mode.CASCADE)
    assert config.sweep.grids == {"unrolled": {"k": "1"}} and args.preset == "mnist"
    # --print_config prints a file that resolves to the same settings
    assert main(["evaluate", "--model.name", "m", "--config", str(settings), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "mode: CASCADE" in printed and "steps: 12" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    _, _, again = resolve(["--config", str(tmp_path / "printed.yaml")])
    assert again == dataclasses.replace(config, step=0.01)  # the file's, not the option's step
    err = _refused(["--model.name", "m", "--preset", "imagenet"], capsys)
    assert "unknown evaluation preset 'imagenet'; choose one of cifar10_l2, cifar10_paper" in err
    err = _refused(["--model.name", "m", "--steps", "0"], capsys)
    assert "steps must be an int >= 1, got 0" in err  # the dataclass's own validation
    err = _refused(["--model.name", "m", "--eps", "big"], capsys)
    assert 'key "eps"' in err and "big" in err
    assert "FAMILY.PARAM=VALUES" in _refused(["--model.name", "m", "--sweep", "unrolled=1"], capsys)


def test_the_example_builder_module_fits_its_documented_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/own_deq_builder.py, imported from its folder as its docstring says."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.chdir(examples)
    try:
        _build("--model.name", "own_deq_builder:build")
        module = sys.modules["own_deq_builder"]
        net = module.DigitsDEQ()
        path = tmp_path / "own_deq.pt"
        torch.save({"epoch": 4, "state_dict": net.state_dict()}, path)
        for argv in (
            ["--model.name", "own_deq_builder:build"],
            ["--model.name", "own_deq_builder:build_adapted",
             "--model.key_map+", "encoder.=injection.", "--model.key_map+", "layer.=f."],
        ):  # fmt: skip
            built = _build(*argv, "--model.checkpoint", str(path))
            assert torch.equal(built.model.f.conv.weight_v, net.layer.conv.weight_v)
            assert built.model.input_shape == (1, 8, 8)
            assert built.model.solver.threshold == 20
    finally:
        sys.modules.pop("own_deq_builder", None)


def test_dry_run_prints_the_expected_cost_and_attacks_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["evaluate", "--model.name", "small_conv_deq", "--model.args.in_channels", "1",
            "--model.args.image_size", "8", "--model.forward_threshold", "3",
            "--model.training-gradient", "phantom", "--n-dev", "4", "--n-test", "6", *TINY,
            "--mode", "verdict", "--dry-run", "true", "--out-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "expected cost (verdict mode, 6 test and 4 development images)" in printed
    for step in ("early_exit", "sweep", "clean", "columns", "total"):
        assert step in printed and "f evaluations" in printed
    assert not out.exists()


def test_the_entropy_defense_runs_from_the_command_line(tmp_path: Path, capsys) -> None:
    """``--entropy_defense true``: the defense's step runs after the columns (its adaptive
    AutoAttack too, AutoAttack being among the attacks) and the report carries it; a solver
    threshold below one round of the defense is refused before work."""
    out = tmp_path / "out"
    model = [
        "--model.name",
        "small_conv_deq",
        "--model.args.in_channels",
        "1",
        "--model.args.image_size",
        "8",
        "--model.training-gradient",
        "phantom",
        "--n-dev",
        "4",
        "--n-test",
        "6",
    ]
    defense = ["--entropy_defense", "true", "--entropy-steps", "2", "--entropy_step", "0.025",
               "--entropy_eps", "0.1"]  # fmt: skip
    argv = [
        "evaluate",
        *model,
        "--model.forward_threshold",
        "3",
        *TINY,
        *defense,
        "--out-dir",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    entropy = results["entropy_defense"]
    assert entropy["settings"]["defense"] == {"steps": 2, "step": 0.025, "eps": 0.1, "every": 2}
    assert entropy["settings"]["threat"]["eps"] == 0.1 and entropy["settings"]["n"] == 6
    assert {"non-adaptive PGD", "adaptive PGD (BPTT)", "adaptive AutoAttack",
            "adaptive worst case"} <= set(entropy["correct"])  # fmt: skip
    worst, authors = entropy["adaptive_worst_case"], entropy["non_adaptive"]
    assert worst["accuracy"] <= authors["accuracy"] and worst["n"] == 6
    assert "entropy_defense" in results["timings"]
    assert "## Input-entropy-reduction defense" in (out / "results.md").read_text()
    assert "adaptive worst case" in (out / "results.tex").read_text()
    capsys.readouterr()
    assert main([*argv, "--dry-run", "true"]) == 0  # its cost is not counted in advance
    assert "columns of unknown cost: entropy defense" in capsys.readouterr().out
    refused = [
        "evaluate",
        *model,
        "--model.forward_threshold",
        "1",
        *TINY,
        *defense,
        "--out-dir",
        str(out),
    ]
    assert main(refused) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("deq-attacks evaluate: the solver's threshold 1 is below the defense's 2 "
                   "solver steps per round")  # fmt: skip
