"""One training path for every data source: arrays in memory go through the same data layer as
a data set the config names (equal runs, bit for bit), the adversaries use the training
gradient's estimate, a run folder refuses other data, and every problem that can be seen
before training (dev_size, batch, model entry point, image shape, classes) is one clear
ValueError raised before any training step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deq_attacks import Phantom
from deq_attacks.data import ImageDataset, load_digits
from deq_attacks.splits import DIGITS_TRAIN_POOL, held_out_data, training_split
from deq_attacks.training import MEMORY_DATA, ConfigMismatchError, run_training
from deq_attacks.training import loop as loop_module
from deq_attacks.training.data_loading import load_training_data
from tests.training_fixtures import entry_point, tiny_preset


def _config(**changes):
    """Two epochs of 3 steps on 24 of the digits' training pool: one pretraining step, then
    PGD-2 with the phantom gradient Phantom(5, 0.5); augmentation and random starts on."""
    values = dict(train_limit=24, epochs=2, pretrain_steps=1, crop_padding=1, dev_size=8)
    values.update(changes)
    return tiny_preset("deq_large_unrolling", **values)


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    state = json.loads((run_dir / "state.json").read_text())
    return load_file(str(run_dir / "checkpoints" / state["checkpoint"] / "model.safetensors"))


def test_arrays_in_memory_train_exactly_as_the_named_data(tmp_path: Path) -> None:
    """The digits' training pool passed as an ImageDataset, as numpy (x, y) and as torch
    (x, y) gives the run that ``data="digits"`` gives: same weights, losses, dev results."""
    named = run_training(_config(), tmp_path / "named", log=lambda _: None)
    pool = load_digits().split(DIGITS_TRAIN_POOL)[0]
    memory = _config(source=MEMORY_DATA)
    runs = {
        "dataset": pool,
        "numpy": (pool.x, pool.y),
        "torch": (torch.from_numpy(pool.x), torch.from_numpy(pool.y)),
    }
    expected = _final(tmp_path / "named")
    for name, data in runs.items():
        result = run_training(memory, tmp_path / name, log=lambda _: None, data=data)
        assert (result.image_shape, result.num_classes) == ((1, 8, 8), 10)
        got = _final(tmp_path / name)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), (name, key)
        for a, b in zip(named.state.history, result.state.history, strict=True):
            for key in ("train_loss", "dev_clean_accuracy", "dev_pgd_accuracy", "lr"):
                assert a[key] == b[key], (name, key)
        record = json.loads((tmp_path / name / "data.json").read_text())
        assert record["images"] == DIGITS_TRAIN_POOL and len(record["sha256"]) == 64


def test_training_learns_and_the_adversaries_use_the_training_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old in-memory trainer's checks, now of the one loop: clean training lifts dev
    accuracy far above chance; every PGD-AT adversary (and the dev PGD) is made with
    Phantom(5, 0.5), the estimate of the phantom training gradient."""
    seen: list[object] = []
    original = Phantom.injection_gradient

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Phantom, "injection_gradient", spy)
    x, y = load_digits().split(400)[0].x, load_digits().split(400)[0].y
    config = _config(
        source=MEMORY_DATA,
        train_limit=None,
        dev_size=80,
        batch_size=32,
        epochs=3,
        pretrain_steps=20,  # 2 clean epochs of 10 steps, then one PGD-AT epoch
        lr=1e-2,
        args={"channels": 8},
    )
    result = run_training(config, tmp_path, log=lambda _: None, data=(x, y))
    history = result.state.history
    assert [r["phase"] for r in history] == ["pretrain", "pretrain", "pgd-at"]
    assert history[1]["dev_clean_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert seen and all(s == Phantom(5, 0.5) for s in seen)


def test_a_run_folder_refuses_other_data(tmp_path: Path) -> None:
    memory = _config(epochs=1, source=MEMORY_DATA)
    pool = load_digits().split(DIGITS_TRAIN_POOL)[0]
    run_training(memory, tmp_path, log=lambda _: None, data=pool)
    other = pool.subset(np.arange(len(pool))[::-1])  # the same images in another order
    with pytest.raises(ConfigMismatchError, match="was trained on other data"):
        run_training(memory, tmp_path, log=lambda _: None, data=other)
    run_training(memory, tmp_path, log=lambda _: None, data=pool)  # the same data: fine


def _refuses(tmp_path: Path, match: str, config, data=None) -> None:
    """run_training raises ValueError(match) before any training step and any file."""
    with pytest.raises(ValueError, match=match) as error:
        run_training(config, tmp_path / "run", log=lambda _: None, data=data)
    assert "\n" not in str(error.value)  # one line
    assert not (tmp_path / "run" / "state.json").exists()


def test_clear_errors_before_any_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(loop_module, "training_step", no_training)
    memory = _config(source=MEMORY_DATA)
    pool = load_digits().split(DIGITS_TRAIN_POOL)[0]
    _refuses(tmp_path, r"dev_size=1200 is not below the 1200 images", _config(dev_size=1200))
    _refuses(
        tmp_path,
        r"dev_size=50 is not below the 40 images",
        memory.updated(dev_size=50),
        pool.subset(np.arange(40)),
    )
    few = _config(train_limit=16, batch_size=32)
    _refuses(tmp_path, "16 training images .* fewer than one batch of 32", few)
    _refuses(
        tmp_path,
        "cannot import 'no_such_package.models' for model 'no_such_package.models:deq'",
        entry_point(_config(), "no_such_package.models:deq"),
    )
    _refuses(
        tmp_path,
        "has no attribute 'missing'",
        entry_point(_config(), "tests.training_fixtures:missing"),
    )
    _refuses(tmp_path, "data='memory' trains on the arrays passed", memory)
    _refuses(tmp_path, "used only with data.source='memory'", _config(), pool)
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        run_training(memory, tmp_path / "run", data=(pool.x.astype(np.float64), pool.y))
    with pytest.raises(TypeError, match="an ImageDataset or an \\(x, y\\) pair"):
        run_training(memory, tmp_path / "run", data=[pool.x, pool.y])  # type: ignore[arg-type]
    # data whose image shape the model cannot take: 1x6x6 images for a 64-pixel MLP
    rng = np.random.default_rng(0)
    small = ImageDataset(
        rng.random((40, 1, 6, 6), dtype=np.float32), rng.integers(0, 10, 40), "small"
    )
    entry = entry_point(memory, "tests.training_fixtures:mlp_for_64_pixels")
    _refuses(tmp_path, r"does not take the images of small \(shape \(1, 6, 6\)\)", entry, small)
    three = entry_point(entry, "tests.training_fixtures:three_class_deq")
    _refuses(tmp_path, r"returns \(2, 3\) .* expected logits \(2, 10\)", three, pool)


def test_held_out_data_is_disjoint_from_the_training_pool(tmp_path: Path) -> None:
    """What the demo trains on (train + dev of the pool) and what it evaluates on (the
    held-out split) partition the data: the digits' first 1,200 and the rest; an arrays
    file's first 80% and last 20%, or its x_train and x_test."""
    digits = load_digits()
    config = _config(train_limit=None, dev_size=100)
    data = load_training_data(config)
    train_idx, dev_idx = training_split(DIGITS_TRAIN_POOL, 100, None)
    assert sorted([*train_idx, *dev_idx]) == list(range(DIGITS_TRAIN_POOL))
    assert torch.equal(data.dev_x, torch.from_numpy(digits.x[dev_idx]))
    held = held_out_data("digits")
    assert np.array_equal(held.x, digits.x[DIGITS_TRAIN_POOL:])
    path = tmp_path / "arrays.npz"
    np.savez(path, x=digits.x[:50], y=digits.y[:50])
    pool = load_training_data(_config(source=str(path), train_limit=None, dev_size=10))
    assert len(pool) + len(pool.dev_y) == 40
    assert np.array_equal(held_out_data(str(path)).x, digits.x[40:50])
    split = tmp_path / "split.npz"
    np.savez(split, x_train=digits.x[:30], y_train=digits.y[:30], x_test=digits.x[30:45],
             y_test=digits.y[30:45])  # fmt: skip
    assert len(load_training_data(_config(source=str(split), train_limit=None, dev_size=10))) == 20
    assert np.array_equal(held_out_data(str(split)).x, digits.x[30:45])
    with pytest.raises(FileNotFoundError, match="not 'digits', 'cifar10:ROOT' or an arrays"):
        held_out_data("cifar10")
