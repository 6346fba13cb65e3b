"""One model spec and one builder: ``evaluate``, ``train`` and ``benchmark()`` name the model
with the same ``ModelSpec`` fields and build it with the same ``build_model``; one fit check of
the input contract refuses data a model was not built for, for all of them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deq_attacks import Broyden, ImplicitGradient, PhantomGradient
from deq_attacks.cli import evaluate as evaluate_cli
from deq_attacks.cli import train as train_cli
from deq_attacks.cli.options import settings
from deq_attacks.evaluation import SweepConfig, benchmark
from deq_attacks.interfaces.inputs import check_data, check_model_fits
from deq_attacks.model_spec import Gradient, ModelSpec, build_model
from deq_attacks.models import mlp_deq
from deq_attacks.training import preset
from deq_attacks.training.build import training_model


def test_evaluate_and_train_take_the_same_model_options() -> None:
    """Every ModelSpec field is an option of both commands under one name (--model.FIELD)."""
    fields = {f.name for f in dataclasses.fields(ModelSpec)}

    def model_options(parser) -> set[str]:  # type: ignore[no-untyped-def]
        names = {o for a in parser._actions for o in a.option_strings if o.startswith("--model.")}
        return {n[len("--model.") :].rstrip("+") for n in names if "-" not in n[2:]}

    assert model_options(evaluate_cli.build_parser()) == fields
    assert model_options(train_cli.build_parser()) == fields


def test_one_spec_builds_the_same_model_from_evaluate_and_from_train() -> None:
    """The demo preset's model, named by evaluate's options, builds to the model training
    builds: same solver, training gradient and weights (from the same seed)."""
    argv = ["--model.name", "small_conv_deq", "--model.args.channels", "16",
            "--model.args.dropout", "0.0", "--model.training_gradient", "phantom",
            "--model.forward_solver", "broyden", "--model.forward_threshold", "8",
            "--model.solver_tol", "1e-4"]  # fmt: skip
    spec = settings(ModelSpec, evaluate_cli.build_parser().parse_args(argv).model)
    trained = preset("demo")
    assert spec == trained.model
    _, _, config = train_cli.resolve(["--preset", "demo", *argv])
    assert config == trained
    torch.manual_seed(0)
    built = build_model(spec, (1, 8, 8), 10)
    torch.manual_seed(0)
    model = training_model(trained, (1, 8, 8), 10)
    assert built.model.solver == model.solver == Broyden(threshold=8, tol=1e-4)  # type: ignore[union-attr]
    assert built.model.training_gradient == PhantomGradient(5, 0.5)
    for (name, a), (_, b) in zip(built.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    # the data fills the builder's in_channels, image_size and num_classes (args win)
    assert built.model.input_shape == (1, 8, 8)
    wide = build_model(dataclasses.replace(spec, args={"image_size": 12}), (1, 8, 8), 10)
    assert wide.model.input_shape == (1, 12, 12)


def test_the_spec_validates_itself_and_the_builder_refuses_before_building() -> None:
    with pytest.raises(ValueError, match="phantom_k must be an int >= 1.*phantom_lam must be in"):
        ModelSpec("small_conv_deq", phantom_k=0, phantom_lam=2.0)  # both at once
    with pytest.raises(ValueError, match="key_map renames the keys of checkpoint"):
        ModelSpec("small_conv_deq", key_map=["a.=b."])
    with pytest.raises(ValueError, match="backward_solver is the exact gradient's"):
        ModelSpec("small_conv_deq", training_gradient=Gradient.PHANTOM, backward_solver="anderson")
    with pytest.raises(ValueError, match="unknown model 'resnet50': registered are"):
        build_model(ModelSpec("resnet50"))
    with pytest.raises(ValueError, match="model.args.bogus: the builder of model resnet18"):
        build_model(ModelSpec("resnet18", args={"bogus": 1}, training_gradient=Gradient.AUTOGRAD))
    exact = build_model(
        ModelSpec("small_conv_deq", training_gradient=Gradient.EXACT, forward_threshold=5),
        (1, 8, 8),
        10,
    )
    # the exact gradient's backward solve: broyden, the forward threshold less one, tol 1e-4
    assert exact.model.training_gradient == ImplicitGradient(Broyden(threshold=4, tol=1e-4))
    with pytest.raises(TypeError, match="resnet18 is a DEQ|not a deq_attacks DEQ"):
        build_model(ModelSpec("resnet18"), (3, 32, 32), 10)
    # the registries' one name rule holds here too: '-' reads as '_'
    dashed = build_model(ModelSpec("small-conv-deq"), (1, 8, 8), 10).model
    assert type(dashed) is type(build_model(ModelSpec("small_conv_deq"), (1, 8, 8), 10).model)
    assert ModelSpec("wrn34-10").is_baseline and not ModelSpec("pkg.mod:build").is_baseline
    with pytest.raises(ValueError, match="wrn34-10 is not a DEQ"):
        ModelSpec("wrn34-10", training_gradient=Gradient.PHANTOM)


def test_one_fit_check_for_every_entry() -> None:
    """check_model_fits: the declared input shape, one forward, the logits' shape, the class
    count and every label; the model's train mode is left as it was."""
    model = build_model(ModelSpec("small_conv_deq"), (1, 8, 8), 10).model.train()
    x = torch.rand(2, 1, 8, 8)
    assert check_model_fits(model, x, torch.tensor([0, 9]), "digits", 10) == 10
    assert model.training
    with pytest.raises(
        ValueError, match=r"built for samples of shape \(1, 8, 8\).*has \(1, 6, 6\)"
    ):
        check_model_fits(model, torch.rand(2, 1, 6, 6), torch.zeros(2), "small")
    with pytest.raises(ValueError, match=r"expected logits \(2, 12\) for its 12 classes"):
        check_model_fits(model, x, torch.zeros(2), "digits", 12)
    with pytest.raises(ValueError, match="digits has label 11, but the model has 10 outputs"):
        check_model_fits(model, x, torch.tensor([0, 11]), "digits")
    mlp = mlp_deq(64, 10, hidden=8)  # declares no input shape: the forward itself fails
    with pytest.raises(
        ValueError, match=r"does not take the images of small \(shape \(1, 6, 6\)\)"
    ):
        check_model_fits(mlp, torch.rand(2, 1, 6, 6), torch.zeros(2), "small")
    with pytest.raises(ValueError, match="test images: x spans"):
        check_data(x * 3, torch.zeros(2, dtype=torch.long), (1, 8, 8), 10, "test")
    with pytest.raises(ValueError, match="development labels: label 10 is outside"):
        check_data(x, torch.tensor([0, 10]), (1, 8, 8), 10, "development")


def test_benchmark_takes_a_model_spec() -> None:
    spec = ModelSpec("small_conv_deq", args={"channels": 4}, training_gradient=Gradient.PHANTOM)
    sweep = SweepConfig({"adjoint": {"n": "1", "beta": "1.0"},
                         "unrolled": {"n": "1", "k": "1", "lam": "1.0"}})  # fmt: skip
    cost = benchmark(
        spec, n_examples=4, dataset="digits", eps=0.1, batch_size=4, n_dev=4, steps=1,
        bptt=False, sweep=sweep, dry_run=True, progress=None,
    )  # fmt: skip
    assert isinstance(cost, dict) and cost["expected_wall_s"] > 0
    with pytest.raises(TypeError, match="benchmark\\(\\) takes DEQs"):
        benchmark(ModelSpec("resnet18", training_gradient=Gradient.AUTOGRAD), 4, "digits")
