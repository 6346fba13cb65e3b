"""``train_cached``: one run folder per config in a shared cache (``<cache>/<name>-<config
fingerprint>``), found again at once by a second caller, the model back with its best weights;
``RunResult.load_best``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deq_attacks.checkpoints import read_checkpoint
from deq_attacks.training import train_cached
from tests.training_fixtures import tiny_preset


def test_a_second_caller_finds_the_run_and_gets_the_best_weights(tmp_path: Path) -> None:
    config = tiny_preset("cpu_unrolling")
    first = train_cached(config, tmp_path, "unrolling", log=lambda text: None)
    assert first.run_dir == tmp_path / f"unrolling-{config.fingerprint()}"
    assert first.state.epochs_done == config.optimiser.epochs
    best = read_checkpoint(first.run_dir / "best.safetensors").state
    assert not first.model.training
    assert all(torch.equal(v, best[k]) for k, v in first.model.state_dict().items())
    lines: list[str] = []
    # a run-only setting (threads) computes the same run: the same folder, nothing trained
    same = config.updated(threads=2)
    again = train_cached(same, tmp_path, "unrolling", lines.append)
    assert again.run_dir == first.run_dir
    assert [p.name for p in tmp_path.iterdir()] == [first.run_dir.name]
    assert lines[-1] == f"{first.run_dir}: all {config.optimiser.epochs} epochs are done"
    assert not any(line.startswith("training ") for line in lines)
    with torch.no_grad():
        next(again.model.parameters()).add_(1.0)
    assert again.load_best().training is False  # load_best restores the best epoch's weights
    assert all(torch.equal(v, best[k]) for k, v in again.model.state_dict().items())


def test_a_name_must_be_a_folder_prefix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="folder-name prefix"):
        train_cached(tiny_preset("cpu_unrolling"), tmp_path, "a/b")
    assert list(tmp_path.iterdir()) == []
