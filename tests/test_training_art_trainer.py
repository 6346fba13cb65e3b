"""ART's own trainer as a path of ``run_training`` and ``deq-attacks train``
(``execution.trainer="art_madry"``, issue 27, item 1): ``AdversarialTrainerMadryPGD`` over a
``DEQEstimator`` is what trains (the weights of calling it by hand, to 1e-6); a run writes the
outputs of the default path and trains; it resumes after an epoch bit-identically; the
settings ART's trainer cannot honour are refused, each named, in one line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from art.defences.trainer import AdversarialTrainerMadryPGD
from safetensors.torch import load_file

from deq_attacks import DEQEstimator, ready_made
from deq_attacks.cli import train as train_cli
from deq_attacks.distributed import Processes
from deq_attacks.records import to_jsonable
from deq_attacks.training import TrainConfig, run_training
from deq_attacks.training import loop as training_loop
from deq_attacks.training.build import optimizer_and_schedule, training_model
from deq_attacks.training.config import Device
from deq_attacks.training.data_loading import load_training_data
from deq_attacks.training.resume import seed_everything
from tests.training_fixtures import tiny_preset

#: Keys of an epoch's record that measure time, not what was computed.
TIMING = {"samples_per_s", "train_seconds", "dev_seconds"}


def _config(**changes: object) -> TrainConfig:
    """2 epochs of ART's trainer: 64 digits in batches of 16, PGD-2 at eps 0.1, the phantom
    gradient, no pretraining or regulariser (ART's trainer has neither)."""
    values: dict[str, object] = dict(
        trainer="art_madry",
        pretrain_steps=0,
        jac_weight=0.0,
        epochs=2,
        train_limit=64,
        dev_size=32,
        batch_size=16,
        eval_batch_size=32,
        lr=1e-2,
    )
    values.update(changes)
    return tiny_preset("demo", **values)


def _quiet(_: str) -> None:
    pass


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = json.loads((run_dir / "state.json").read_text())
    return load_file(str(run_dir / "checkpoints" / state["checkpoint"] / "model.safetensors"))


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def _history(run_dir: Path) -> list[dict[str, object]]:
    state = json.loads((run_dir / "state.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in state["history"]]


def test_the_weights_are_those_of_arts_trainer_called_by_hand(tmp_path: Path) -> None:
    config = _config(epochs=1)
    result = run_training(config, tmp_path / "run", log=_quiet)
    # by hand: the run's initial weights, Adam and schedule, ART's trainer from the run's seed
    data = load_training_data(config)
    seed_everything(config.execution.seed)
    model = training_model(config, data.image_shape, data.num_classes)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, schedule = optimizer_and_schedule(model, config, 4)
    estimator = DEQEstimator(
        model,
        input_shape=data.image_shape,
        nb_classes=data.num_classes,
        optimizer=optimizer,
        estimate=ready_made(model.training_gradient),
        device_type="cpu",
    )
    seed_everything(config.execution.seed)
    trainer = AdversarialTrainerMadryPGD(
        estimator, nb_epochs=1, batch_size=16, eps=0.1, eps_step=0.05, max_iter=2
    )
    trainer.fit(data.train.x.numpy(), data.train.y.numpy(), scheduler=schedule)
    run = result.model.state_dict()
    moved = max(float((run[k] - initial[k]).abs().max()) for k in initial)
    gap = max(float((run[k] - v).abs().max()) for k, v in model.state_dict().items())
    print(f"weights moved by up to {moved:.3g}; run vs ART by hand: {gap:.3g}")
    assert moved > 1e-3
    assert gap < 1e-6
    assert schedule.get_last_lr()[0] == pytest.approx(result.state.history[0]["lr"])


def test_a_run_and_the_command_write_the_default_paths_outputs_and_train(tmp_path: Path) -> None:
    config = _config()
    art = run_training(config, tmp_path / "art", log=_quiet)
    default = _config(trainer="deq_attacks")
    run_training(default, tmp_path / "default", log=_quiet)
    assert _files(tmp_path / "art") == _files(tmp_path / "default")
    art_history, default_history = _history(tmp_path / "art"), _history(tmp_path / "default")
    assert [sorted(r) for r in art_history] == [sorted(r) for r in default_history]
    # the command: the default config's file, the trainer chosen by its option
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_jsonable(default)))
    argv = ["--config", str(config_file), "--execution.trainer", "art_madry"]
    assert train_cli.main([*argv, "--out-dir", str(tmp_path / "cli")]) == 0
    assert _files(tmp_path / "cli") == _files(tmp_path / "art")
    assert _history(tmp_path / "cli") == art_history
    cli_weights, art_weights = _weights(tmp_path / "cli"), _weights(tmp_path / "art")
    assert all(torch.equal(cli_weights[k], art_weights[k]) for k in art_weights)
    first, last = art.state.history[0], art.state.history[-1]
    print(
        f"ART's trainer: loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, dev clean "
        f"{last['dev_clean_accuracy']:.1%}, dev PGD {last['dev_pgd_accuracy']:.1%}"
    )
    assert last["train_loss"] < first["train_loss"] - 0.3
    assert last["dev_clean_accuracy"] > 0.3  # chance: 0.1
    assert art.state.global_step == 8 and last["lr"] == pytest.approx(1e-5)  # per-step cosine


class _Stop(Exception):
    pass


def _stop_after_epoch_1(message: str) -> None:
    if message.startswith("epoch 1/"):
        raise _Stop


def test_a_run_stopped_after_epoch_1_resumes_bit_identically(tmp_path: Path) -> None:
    base = _config(crop_padding=1)  # augmentation and dropout draw on torch's saved stream
    config = base.updated(
        model=dataclasses.replace(base.model, args={"channels": 4, "dropout": 0.2})
    )
    run_training(config, tmp_path / "whole", log=_quiet)
    with pytest.raises(_Stop):
        run_training(config, tmp_path / "stopped", log=_stop_after_epoch_1)
    assert json.loads((tmp_path / "stopped" / "state.json").read_text())["epochs_done"] == 1
    messages: list[str] = []
    run_training(config, tmp_path / "stopped", log=messages.append)
    assert messages[0].startswith(f"resuming {tmp_path / 'stopped'} after epoch 1")
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "stopped")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _history(tmp_path / "stopped") == _history(tmp_path / "whole")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"adversarial": False}, "threat.adversarial false"),
        ({"norm": "L2", "eps": 0.5, "step": 0.1}, "threat.norm L2"),
        ({"pretrain_steps": 5}, "optimiser.pretrain_steps 5"),
        ({"jac_weight": 0.4}, "optimiser.jac_weight 0.4"),
        ({"random_state": True}, "optimiser.random_state"),
        ({"bf16": True, "device": Device.CUDA}, "execution.bf16"),
        ({"channels_last": True}, "execution.channels_last"),
    ],
)
def test_each_setting_arts_trainer_cannot_honour_is_refused_in_one_line(
    changes: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError) as caught:
        _config(**changes)
    message = str(caught.value)
    assert f"execution.trainer art_madry cannot honour {named} (" in message
    assert "\n" not in message
    _config(trainer="deq_attacks", **changes)  # the default trainer takes it


def test_several_refused_settings_are_named_together_and_a_bad_trainer_lists_the_choices() -> None:
    with pytest.raises(ValueError) as caught:
        _config(pretrain_steps=5, jac_weight=0.4)
    message = str(caught.value)
    assert "optimiser.pretrain_steps 5" in message and "optimiser.jac_weight 0.4" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="trainer must be one of deq_attacks, art_madry, got 'x'"):
        _config(trainer="x")


def test_arts_trainer_under_torchrun_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextlib.contextmanager
    def two_processes(device: str) -> Iterator[Processes]:
        yield Processes(rank=0, world=2, device=torch.device(device))

    monkeypatch.setattr(training_loop.distributed, "process_group", two_processes)
    with pytest.raises(ValueError, match="art_madry runs in one process .* without torchrun"):
        run_training(_config(), tmp_path / "ddp", log=_quiet)
    assert not (tmp_path / "ddp").exists()


def test_a_baseline_trains_through_arts_trainer_with_its_last_smaller_batch(
    tmp_path: Path,
) -> None:
    config = tiny_preset(
        "resnet18_pgd_at",
        trainer="art_madry",
        pretrain_steps=0,
        epochs=2,
        train_limit=40,
        batch_size=16,
    )
    result = run_training(config, tmp_path / "resnet", log=_quiet)
    first, last = result.state.history
    # 40 images: batches of 16, 16 and 8 per epoch; the cosine decay ends with the last one
    assert [first["global_step"], last["global_step"]] == [3, 6]
    assert last["lr"] == pytest.approx(config.optimiser.lr_min)
    assert 0 <= last["train_accuracy"] <= 1 and last["train_loss"] > 0
