"""The training loop: one short CPU epoch of every paper preset's code path, what an epoch logs,
the schedules (pretraining steps, cosine per step, which steps carry the Jacobian penalty), the
unrolled pretraining network and its reset hooks, the global batches, and the refusal to train
through an Early/Ensemble readout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deq_attacks.deq import Early, Ensemble, JacobianRegularization
from deq_attacks.deq.dropout import reset_variational_dropout
from deq_attacks.models import small_conv_deq
from deq_attacks.splits import training_split
from deq_attacks.training import loop as loop_module
from deq_attacks.training import monitor as monitor_module
from deq_attacks.training import run_training
from deq_attacks.training.build import JacobianSchedule, jacobian_schedule, unrolled_logits
from deq_attacks.training.data_loading import (
    GlobalBatchSampler,
    epoch_loader,
    load_training_data,
)
from deq_attacks.training.plots import plot_history
from tests.training_fixtures import PAPER_PRESETS, tiny_preset

#: One preset per code path (exact with short and long solves, phantom, both baselines, both
#: DEQ sizes); the others differ from these only in thresholds (checked in test_training_config).
CODE_PATHS = [
    "deq_large_exact_8_7",
    "deq_large_exact_50_50",
    "deq_large_unrolling",
    "deq_xl_exact_18_20",
    "deq_xl_unrolling",
    "resnet18_pgd_at",
    "wrn34_10_pgd_at",
]


def test_code_paths_cover_every_paper_preset() -> None:
    """Every paper preset's tiny version differs from one of CODE_PATHS in thresholds only."""
    for name in PAPER_PRESETS:
        config = tiny_preset(name)
        keys = [{d.split(":")[0] for d in tiny_preset(p).differences(config)} for p in CODE_PATHS]
        assert any(k <= {"model.forward_threshold", "model.backward_threshold"} for k in keys), name


@pytest.mark.parametrize("name", CODE_PATHS)
def test_one_short_epoch_of_each_paper_preset(name: str, tmp_path: Path) -> None:
    """Pretraining step, PGD-AT step, dev evaluation, logs, plot and checkpoint all run."""
    config = tiny_preset(name)
    result = run_training(config, tmp_path, log=lambda _: None)
    record = result.state.history[0]
    assert record["phase"] == "pretrain+pgd-at" and record["global_step"] == 2
    for key in ("dev_clean_accuracy", "dev_pgd_accuracy"):
        assert 0.0 <= record[key] <= 1.0
    assert record["samples_per_s"] > 0
    if config.is_deq:
        residuals = record["dev_residuals"]
        assert len(residuals) == config.model.forward_threshold
        assert all(math.isfinite(r) and r >= 0 for r in residuals)
        assert record["dev_spectral_radius"] > 0
    else:
        assert "dev_residuals" not in record
    for file in ("config.json", "state.json", "metrics.jsonl", "best.safetensors"):
        assert (tmp_path / file).is_file(), file
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    assert (tmp_path / "checkpoints" / "epoch-0001" / "model.safetensors").is_file()


def test_schedules_pretraining_cosine_and_jacobian_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 epochs of 2 steps: 3 pretraining steps (unrolled: no penalty), then DEQ-mode PGD-AT;
    the penalty (every DEQ-mode step) stops at epoch index 2: exactly global step 3 carries
    it, which the loop passes to the step; the learning rate follows the per-step cosine."""
    config = tiny_preset(
        "deq_large_exact_8_7",
        epochs=3,
        pretrain_steps=3,
        jac_frequency=1.0,
        jac_stop_epoch=2,
        lr=1e-2,
        lr_min=1e-4,
    )
    carried: list[bool] = []
    original = loop_module.training_step

    def spy(ctx, x, y, adversarial, unrolled, penalty=None, **kwargs):
        carried.append(penalty is not None)
        return original(ctx, x, y, adversarial, unrolled, penalty, **kwargs)

    monkeypatch.setattr(loop_module, "training_step", spy)
    result = run_training(config, tmp_path, log=lambda _: None)
    history = result.state.history
    assert [r["phase"] for r in history] == ["pretrain", "pretrain+pgd-at", "pgd-at"]
    assert carried == [False, False, False, True, False, False]
    assert history[0]["jacobian_penalty"] is None  # no regulariser in pretraining
    assert history[1]["jacobian_penalty"] > 0  # the one DEQ-mode step of epoch 2
    assert history[2]["jacobian_penalty"] is None  # stopped
    plot = plot_history(history, tmp_path / "traces.png")
    assert plot.stat().st_size > 10_000
    for r in history:
        t = r["global_step"]
        expected = 1e-4 + 0.5 * (1e-2 - 1e-4) * (1 + math.cos(math.pi * t / 6))
        assert r["lr"] == pytest.approx(expected, rel=1e-9)


def test_jacobian_schedule_counts_deq_mode_steps_from_the_global_step() -> None:
    """Frequency 0.25 from global step 10 until epoch 3: DEQ-mode steps 3, 7, 11, ... carry
    it (floor((i+1)/4) > floor(i/4)); the counter is the global step alone."""
    schedule = JacobianSchedule(JacobianRegularization(0.4), 0.25, start_step=10, stop_epoch=3)
    epoch_of = [s // 8 for s in range(40)]  # 8 steps per epoch
    carrying = [s for s in range(40) if schedule.applies(s, epoch_of[s])]
    assert carrying == [13, 17, 21]  # 25 is in epoch 3: stopped
    assert schedule.applies(25, 2) and not schedule.applies(25, 3)
    assert not any(schedule.applies(s, 0) for s in range(10))  # pretraining
    every = JacobianSchedule(JacobianRegularization(0.4), 1.0, start_step=0, stop_epoch=5)
    assert all(every.applies(s, 0) for s in range(20))
    with pytest.raises(ValueError, match="frequency must be in"):
        JacobianSchedule(JacobianRegularization(0.4), 0.0, 0, 1)
    paper = jacobian_schedule(tiny_preset("deq_large_exact_8_7", jac_frequency=0.02))
    assert paper is not None and paper.regularization.weight == 0.4
    assert (paper.frequency, paper.start_step) == (0.02, 1)
    assert jacobian_schedule(tiny_preset("deq_large_exact_8_7", jac_weight=0.0)) is None
    assert jacobian_schedule(tiny_preset("resnet18_pgd_at")) is None


def test_dev_pgd_has_a_random_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    original = monitor_module.make_adversary

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "make_adversary", spy)
    config = tiny_preset("deq_large_unrolling", random_start=False)  # training PGD without one
    run_training(config, tmp_path, log=lambda _: None)
    assert calls and all(args[2].random_start is True for args in calls)  # the dev PGD's


def test_unrolled_pretraining_network_is_f_applied_depth_times() -> None:
    torch.manual_seed(0)
    deq = small_conv_deq(in_channels=1, num_classes=10, channels=4, image_size=8)
    x = torch.rand(3, 1, 8, 8)
    injection = deq.inject(x)
    z = torch.zeros_like(injection)
    for _ in range(5):
        z = deq.f(z, injection)
    torch.testing.assert_close(unrolled_logits(deq, x, 5), deq.head(z), rtol=0, atol=0)
    loss = F.cross_entropy(unrolled_logits(deq, x, 5), torch.tensor([0, 1, 2]))
    loss.backward()  # autograd through all applications: f and the injection get gradients
    assert deq.f.conv1.weight.grad is not None and deq.injection.conv.weight.grad is not None


def test_unrolled_pretraining_runs_the_models_reset_hooks() -> None:
    """Through ``deq.reset()``: a user's own hook (torchdeq's reset_norm, reset_dropout) runs
    once per unrolled forward, as before a solve, and the default hook redraws the dropout
    mask (one mask per forward, shared by the depth applications of f)."""
    calls: list[nn.Module] = []

    def counting(f: nn.Module) -> None:
        calls.append(f)

    torch.manual_seed(0)
    deq = small_conv_deq(
        in_channels=1,
        num_classes=10,
        channels=4,
        image_size=8,
        dropout=0.5,
        resets=(reset_variational_dropout, counting),
    ).train()
    x = torch.rand(3, 1, 8, 8)
    unrolled_logits(deq, x, 4)
    assert calls == [deq.f]
    first = deq.f.drop.mask.clone()
    unrolled_logits(deq, x, 4)
    assert len(calls) == 2 and not torch.equal(first, deq.f.drop.mask)  # a new mask
    deq(x)  # a DEQ-mode forward runs them the same way
    assert len(calls) == 3


def test_global_batches_are_the_same_for_one_and_two_processes() -> None:
    one = list(GlobalBatchSampler(50, 10, seed=3, epoch=2))
    ranks = [list(GlobalBatchSampler(50, 10, seed=3, epoch=2, rank=r, world=2)) for r in (0, 1)]
    assert len(one) == 5 and all(len(b) == 10 for b in one)
    for b, batch in enumerate(one):
        assert ranks[0][b] + ranks[1][b] == batch
    assert one != list(GlobalBatchSampler(50, 10, seed=3, epoch=3))  # a new order per epoch
    assert sorted(i for b in one for i in b) == list(range(50))
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(50, 10, seed=0, epoch=0, world=3)


@pytest.mark.parametrize("readout", [Early(2), Ensemble()])
def test_training_through_early_or_ensemble_is_refused(readout) -> None:
    """Issue item 7: the head alone would learn; the backward refuses instead."""
    torch.manual_seed(0)
    deq = small_conv_deq(in_channels=1, num_classes=10, channels=4, image_size=8, readout=readout)
    deq.train()
    loss = F.cross_entropy(deq(torch.rand(2, 1, 8, 8)), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="cannot train through the"):
        loss.backward()
    deq.eval()  # evaluation through the defense still works
    with torch.no_grad():
        assert deq(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_arrays_file_split_and_augmentation(shared_dir: Path) -> None:
    """A CIFAR-10 arrays file: x_train only is read, 100 dev images held out of it (disjoint
    from the training images), RandomCrop(32, padding=4) + flip applied per item."""
    path = shared_dir / "data" / "cifar10_subset.npz"
    config = tiny_preset("deq_large_unrolling", source=str(path), dev_size=100, train_limit=None)
    config = config.updated(crop_padding=4, flip=True)
    data = load_training_data(config)
    assert data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert len(data) == 4660 - 100 and len(data.dev_y) == 100
    train_idx, dev_idx = training_split(4660, 100, None)
    assert not set(train_idx.tolist()) & set(dev_idx.tolist())
    raw = torch.from_numpy(np.load(path)["x_train"][train_idx[:20]]).float() / 255
    torch.manual_seed(0)
    augmented = torch.stack([data.train[i][0] for i in range(20)])
    assert augmented.shape == raw.shape
    assert not torch.equal(augmented, raw)  # shifted and/or mirrored
    assert torch.equal(torch.stack([data.train[i][1] for i in range(20)]), data.train.y[:20])


def test_missing_cifar10_is_a_clear_error(tmp_path: Path) -> None:
    config = tiny_preset("deq_large_unrolling", source="cifar10", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="--download true"):
        load_training_data(config)


def test_cifar10_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torchvision path on a CIFAR-10-format folder (random images, 5 batches of 40; the
    archive's checksums are skipped): dev split from the training set, augmented loader."""
    import pickle

    import torchvision.datasets.cifar
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 200).tolist()
    for i in range(5):
        batch = {"data": images[40 * i : 40 * (i + 1)], "labels": labels[40 * i : 40 * (i + 1)]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(c) for c in range(10)]})
    )
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)

    config = tiny_preset(
        "deq_large_exact_8_7", source="cifar10", data_root=tmp_path, dev_size=50, train_limit=None
    )
    data = load_training_data(config)
    assert (len(data), len(data.dev_y), data.image_shape) == (150, 50, (3, 32, 32))
    _, dev_idx = training_split(200, 50, None)
    expected_dev = torch.from_numpy(images[dev_idx].reshape(50, 3, 32, 32)).float() / 255
    torch.testing.assert_close(data.dev_x, expected_dev, rtol=0, atol=1e-7)
    assert data.dev_y.tolist() == [labels[i] for i in dev_idx]
    x, y = next(iter(epoch_loader(data, config, epoch=0, rank=0, world=1, pin=False)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0 and float(x.max()) <= 1
