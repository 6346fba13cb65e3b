"""Evaluation protocol, checkpoints and the command-line main job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deq_attacks import Broyden, DEQEstimator, Phantom, PhantomGradient
from deq_attacks.checkpoints import load_weights, save_weights
from deq_attacks.cli import main
from deq_attacks.evaluation import Column, EvaluationConfig, ThreatModel, attack_names
from deq_attacks.evaluation.attacks import FixedStepPGD, Square
from deq_attacks.models import mlp_deq


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


def test_column_and_config_validation() -> None:
    with pytest.raises(ValueError, match="needs a gradient estimate"):
        Column("pgd", FixedStepPGD())
    with pytest.raises(TypeError):
        Column("pgd", "pgd", Phantom())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uses no gradient"):
        Column("square", Square(), Phantom())
    with pytest.raises(ValueError):
        ThreatModel(eps=2.0)
    with pytest.raises(ValueError, match="AutoAttack iterations must be an int >= 1"):
        EvaluationConfig(attacks="pgd,autoattack:iterations=0")
    # the attacks come from the registry, and the errors name the registered ones
    with pytest.raises(ValueError, match="unknown attack 'nope'; choose one of .*autoattack"):
        EvaluationConfig(attacks="pgd,nope")
    assert set(attack_names()) >= {"pgd", "autoattack", "square", "apgd_ce", "apgd_dlr",
                                   "art_autoattack"}  # fmt: skip
    with pytest.raises(ValueError, match="needs the fixed-step PGD"):
        EvaluationConfig(attacks="square")
    with pytest.raises(ValueError, match="named twice"):
        EvaluationConfig(attacks="pgd,square,pgd")
    with pytest.raises(ValueError, match="precision"):
        EvaluationConfig(precision="fp16")
    with pytest.raises(ValueError, match="apgd_ce cannot run in bf16"):
        EvaluationConfig(attacks="pgd,apgd-ce", precision="bf16")
    with pytest.raises(ValueError, match="unknown compile backend"):
        EvaluationConfig(compile_backend="no-such-backend")
    with pytest.raises(ValueError, match="seed"):
        EvaluationConfig(seed=-1)


def test_cli_main_job_writes_table(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "--out-dir",
            str(tmp_path),
            "--native_kernels",  # torch already ran here: the kernels cannot be pinned now
            "true",
            "--train.optimiser.epochs",
            "1",
            "--train.threat.adversarial",
            "false",
            "--train.model.args.channels",
            "4",
            "--train.model.forward_threshold",
            "3",
            "--n-test",
            "8",
            "--n-dev",
            "8",
            "--steps",
            "1",
            "--eval.attacks",
            "pgd,autoattack:iterations=2,square:queries=5",
            "--eval.long_steps",
            "2",
            "--eval.batch_size",
            "8",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "White-box robustness (per sample" in out and "| defense | clean |" in out
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    assert (tmp_path / "states.png").exists() and (tmp_path / "sweep.png").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["survived"]["final"]["square"]) == 8
