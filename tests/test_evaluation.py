"""Evaluation protocol, training loop, checkpoints and the command-line main job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deq_attacks import Broyden, DEQEstimator, Phantom, PhantomGradient
from deq_attacks.checkpoints import load_weights, save_weights
from deq_attacks.cli import main
from deq_attacks.data import load_digits
from deq_attacks.evaluation import Column, EvaluationConfig, ThreatModel, attack_names
from deq_attacks.evaluation.attacks import FixedStepPGD, Square
from deq_attacks.models import mlp_deq
from deq_attacks.training import TrainingConfig, art_trainer, train


def tiny_estimator(hidden: int = 16) -> DEQEstimator:
    deq = mlp_deq(
        64,
        10,
        hidden=hidden,
        solver=Broyden(threshold=4),
        training_gradient=PhantomGradient(2, 0.5),
    )
    return DEQEstimator(
        deq,
        input_shape=(1, 8, 8),
        nb_classes=10,
        optimizer=torch.optim.Adam(deq.parameters(), 1e-2),
    )


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.x[:300], data.y[:300], data.x[300:340], data.y[300:340]


def test_checkpoint_round_trip_and_mismatch(tmp_path: Path) -> None:
    source, target = tiny_estimator().deq, tiny_estimator().deq
    path = save_weights(source, tmp_path / "m.safetensors")
    load_weights(target, path)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = tiny_estimator(hidden=8).deq
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the model: shape mismatch"):
        load_weights(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(FileNotFoundError):
        load_weights(other, tmp_path / "missing.safetensors")


def test_training_learns_and_resumes(tmp_path: Path, digits) -> None:
    x, y, xv, yv = digits
    estimator = tiny_estimator()
    config = TrainingConfig(clean_epochs=2, batch_size=32, lr=1e-2)
    state = train(
        estimator,
        x,
        y,
        TrainingConfig(clean_epochs=1, batch_size=32, lr=1e-2),
        checkpoint_dir=tmp_path,
        validation=(xv, yv),
    )
    assert state.epochs_done == 1
    resumed_model = tiny_estimator()
    state = train(resumed_model, x, y, config, checkpoint_dir=tmp_path, validation=(xv, yv))
    assert state.epochs_done == 2 and [h["epoch"] for h in state.history] == [1, 2]
    assert state.history[-1]["val_clean_accuracy"] > 0.5
    pgd = [h["val_pgd_accuracy"] for h in state.history]
    assert all(0.0 <= a <= h["val_clean_accuracy"] for a, h in zip(pgd, state.history))
    assert state.best_epoch == 1 + int(np.argmax(pgd))
    assert state.best_val_pgd_accuracy == max(pgd)
    best = tiny_estimator().deq
    load_weights(best, tmp_path / "best.safetensors")
    if state.best_epoch == 2:
        last = resumed_model.deq.state_dict()
        assert all(torch.equal(v, last[k]) for k, v in best.state_dict().items())


def test_adversarial_training_runs_with_matching_estimate(digits) -> None:
    x, y, _, _ = digits
    estimator = tiny_estimator()
    seen = []
    original = Phantom.injection_gradient

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    Phantom.injection_gradient = spy  # type: ignore[method-assign]
    try:
        train(
            estimator,
            x[:64],
            y[:64],
            TrainingConfig(
                clean_epochs=0, adversarial_epochs=1, batch_size=32, eps=0.1, step=0.05, steps=2
            ),
        )
    finally:
        Phantom.injection_gradient = original  # type: ignore[method-assign]
    assert seen and all(s == Phantom(2, 0.5) for s in seen)


def test_validation_pgd_starts_at_random(digits, monkeypatch) -> None:
    _, _, x_val, y_val = digits
    made = []
    original = art_trainer.ProjectedGradientDescent

    def spy(*args, **kwargs):
        made.append(kwargs.get("num_random_init", 0))
        return original(*args, **kwargs)

    monkeypatch.setattr(art_trainer, "ProjectedGradientDescent", spy)
    config = TrainingConfig(clean_epochs=1, batch_size=20, eps=0.1, step=0.05, steps=2)
    record = art_trainer.validate(tiny_estimator(), (x_val, y_val), config, Phantom(2, 0.5))
    assert made == [1] and 0 <= record["val_pgd_accuracy"] <= 1


def test_training_config_validation() -> None:
    with pytest.raises(ValueError, match="at least one epoch"):
        TrainingConfig(clean_epochs=0, adversarial_epochs=0)
    with pytest.raises(ValueError):
        TrainingConfig(eps=0)
    with pytest.raises(ValueError, match="optimizer"):
        est = tiny_estimator()
        est._optimizer = None
        train(est, np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64), TrainingConfig())


def test_column_and_config_validation() -> None:
    with pytest.raises(ValueError, match="needs a gradient estimate"):
        Column("pgd", FixedStepPGD())
    with pytest.raises(TypeError):
        Column("pgd", "pgd", Phantom())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uses no gradient"):
        Column("square", Square(), Phantom())
    with pytest.raises(ValueError):
        ThreatModel(eps=2.0)
    with pytest.raises(ValueError, match="aa_iterations|iterations"):
        EvaluationConfig(aa_iterations=0)
    # the attacks come from the registry, and the errors name the registered ones
    with pytest.raises(ValueError, match="unknown attack 'nope'; choose from .*autoattack"):
        EvaluationConfig(attacks="pgd,nope")
    assert set(attack_names()) >= {"pgd", "autoattack", "square", "apgd-ce", "apgd-dlr",
                                   "art-autoattack"}  # fmt: skip
    with pytest.raises(ValueError, match="needs the fixed-step PGD"):
        EvaluationConfig(attacks="square")
    with pytest.raises(ValueError, match="named twice"):
        EvaluationConfig(attacks="pgd,square,pgd")
    with pytest.raises(ValueError, match="precision"):
        EvaluationConfig(precision="fp16")
    with pytest.raises(ValueError, match="apgd-ce cannot run in bf16"):
        EvaluationConfig(attacks="pgd,apgd-ce", precision="bf16")
    with pytest.raises(ValueError, match="unknown torch.compile backend"):
        EvaluationConfig(compile_backend="no-such-backend")
    with pytest.raises(ValueError, match="seed"):
        EvaluationConfig(seed=-1)


def test_cli_main_job_writes_table(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "--out-dir",
            str(tmp_path),
            "--clean-epochs",
            "1",
            "--adv-epochs",
            "0",
            "--n-test",
            "8",
            "--n-dev",
            "8",
            "--steps",
            "1",
            "--square-queries",
            "5",
            "--aa-iterations",
            "2",
            "--long-steps",
            "2",
            "--attack-batch-size",
            "8",
            "--channels",
            "4",
            "--threshold",
            "3",
            "--batch-size",
            "64",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "White-box robustness (per sample" in out and "| defense | clean |" in out
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    assert (tmp_path / "states.png").exists() and (tmp_path / "sweep.png").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["survived"]["final"]["square"]) == 8
