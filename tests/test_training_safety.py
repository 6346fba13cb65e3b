"""Training stops at garbage: a NaN at step k stops the run there with the last good checkpoint
kept, and the run resumes from it; a checkpoint holding NaN, or a damaged trainer or RNG file, is
refused in one line; a checkpoint write that fails (a full disk) is one line and keeps the last
good checkpoint; Ctrl-C in ``train`` is one line and leaves a resumable run."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deq_attacks.checkpoints import CheckpointError
from deq_attacks.cli import train as train_cli
from deq_attacks.records import to_jsonable
from deq_attacks.training import loop, resume, run_training
from deq_attacks.training.loop import NonFiniteTrainingError
from deq_attacks.training.resume import CheckpointWriteError
from tests.training_fixtures import tiny_preset

#: 3 epochs of 2 steps (16 images, batch 8): global steps 1-2, 3-4, 5-6.
CONFIG = tiny_preset("deq_large_unrolling", epochs=3)


def quiet(_: str) -> None:
    pass


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def inject(monkeypatch, at_call: int, action) -> None:
    """Run ``action(ctx)`` before the ``at_call``-th optimizer step (1-based)."""
    real, calls = loop.training_step, []

    def step(ctx, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            action(ctx)
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr(loop, "training_step", step)


def poison(ctx) -> None:
    with torch.no_grad():
        next(ctx.model.parameters()).fill_(float("nan"))


def test_a_nan_at_step_k_stops_there_and_the_run_resumes_from_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    run_dir = tmp_path / "run"
    inject(monkeypatch, 4, poison)  # the second step of epoch 2
    with pytest.raises(NonFiniteTrainingError) as stopped:
        run_training(CONFIG, run_dir, log=quiet)
    message = str(stopped.value)
    assert "\n" not in message and "step 4 (epoch 2)" in message and "loss is nan" in message
    assert str(run_dir / "checkpoints" / "epoch-0001") in message
    state = state_of(run_dir)
    assert state["epochs_done"] == 1 and state["checkpoint"] == "epoch-0001"
    kept = load_file(str(run_dir / "checkpoints" / "epoch-0001" / "model.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in kept.values())
    monkeypatch.undo()
    result = run_training(CONFIG, run_dir, log=quiet)  # resumes after epoch 1, to the end
    assert result.state.epochs_done == 3 and result.state.global_step == 6
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())


def test_a_nan_before_any_checkpoint_says_there_is_none(tmp_path: Path, monkeypatch) -> None:
    inject(monkeypatch, 1, poison)
    with pytest.raises(NonFiniteTrainingError, match="step 1 .*no checkpoint to resume from"):
        run_training(CONFIG, tmp_path / "run", log=quiet)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A run stopped after its first epoch (of 3): a checkpoint to resume from."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as patch:
        inject(patch, 3, poison)
        with pytest.raises(NonFiniteTrainingError):
            run_training(CONFIG, run_dir, log=quiet)
    return run_dir


def damaged_copy(one_epoch: Path, tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    return run_dir, run_dir / "checkpoints" / "epoch-0001"


def forget_checksum(run_dir: Path, name: str) -> None:
    """Drop a file's recorded SHA-256 (as a run from before checksums, or damage written
    before it was published): the checks behind the checksum must hold on their own."""
    state = state_of(run_dir)
    del state["checksums"][name]
    (run_dir / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("part", ["model.safetensors", "trainer.pt", "rng-rank0.pt"])
def test_resume_refuses_a_checkpoint_file_whose_bytes_changed(one_epoch, tmp_path, part) -> None:
    run_dir, folder = damaged_copy(one_epoch, tmp_path)
    data = bytearray((folder / part).read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the middle
    (folder / part).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256") as error:
        run_training(CONFIG, run_dir, log=quiet)
    assert "\n" not in str(error.value) and part in str(error.value)


def test_resume_refuses_a_checkpoint_with_non_finite_weights(one_epoch, tmp_path) -> None:
    run_dir, folder = damaged_copy(one_epoch, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    name = next(iter(weights))
    weights[name].view(-1)[0] = float("nan")  # what a flipped exponent byte does
    save_file(weights, str(folder / "model.safetensors"))
    forget_checksum(run_dir, "model.safetensors")
    with pytest.raises(CheckpointError, match=f"non-finite values \\(weight {name}\\)") as error:
        run_training(CONFIG, run_dir, log=quiet)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("part", ["trainer.pt", "rng-rank0.pt"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "pickle", "not a dict"])
def test_a_damaged_trainer_or_rng_file_is_one_line(one_epoch, tmp_path, capsys, part, damage):
    run_dir, folder = damaged_copy(one_epoch, tmp_path)
    path = folder / part
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "pickle":
        path.write_bytes(pickle.dumps(Path("x")))  # a pickle that needs code to load
    else:
        torch.save([1, 2], path)
    forget_checksum(run_dir, part)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_jsonable(CONFIG)))
    capsys.readouterr()
    assert train_cli.main(["--config", str(config_file), "--out-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], err
    assert ("cannot be read" if damage != "not a dict" else "not a training checkpoint") in err[0]


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    run_dir = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_disk_save(obj, path, *args, **kwargs):
        saves.append(path)
        if "epoch-0002" in str(path):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4432"
            )
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "save", full_disk_save)
    with pytest.raises(CheckpointWriteError) as error:
        run_training(CONFIG, run_dir, log=quiet)
    message = str(error.value)
    assert "\n" not in message and "epoch 2" in message and "unexpected pos" in message
    assert str(run_dir / "checkpoints" / "epoch-0001") + " is kept" in message
    assert state_of(run_dir)["checkpoint"] == "epoch-0001"
    load_file(str(run_dir / "checkpoints" / "epoch-0001" / "model.safetensors"))
    torch.load(run_dir / "checkpoints" / "epoch-0001" / "trainer.pt", weights_only=True)
    monkeypatch.undo()
    assert run_training(CONFIG, run_dir, log=quiet).state.epochs_done == 3


def test_ctrl_c_in_train_is_one_line_and_leaves_a_resumable_run(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_jsonable(CONFIG)))
    run_dir = tmp_path / "run"
    argv = ["--config", str(config_file), "--out-dir", str(run_dir)]

    def interrupt(_ctx) -> None:
        raise KeyboardInterrupt

    inject(monkeypatch, 4, interrupt)
    capsys.readouterr()
    assert train_cli.main(argv) == 130
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    err = [line for line in err if line.strip() and "it/s]" not in line]  # tqdm's bar aside
    assert len(err) == 1 and "after epoch 1" in err[0] and "run the same command" in err[0]
    monkeypatch.undo()
    assert train_cli.main(argv) == 0
    assert "resuming" in capsys.readouterr().out
    assert state_of(run_dir)["epochs_done"] == 3
