"""Loaders and validation of deq_attacks.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deq_attacks.data import (
    ImageDataset,
    load_arrays_file,
    load_cifar10,
    load_digits,
    load_foolbox_samples,
)


def _small(n: int = 6, c: int = 1, hw: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((n, c, hw, hw), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % 3
    return x, y


# --------------------------------------------------------------------------- digits


def test_digits_shape_range_labels() -> None:
    ds = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert len(ds) == 1797 and ds.num_classes == 10
    assert set(np.unique(ds.y).tolist()) == set(range(10))
    assert np.bincount(ds.y).min() >= 170  # roughly balanced, real data
    # values are the raw 0..16 counts divided by 16
    np.testing.assert_array_equal(np.round(ds.x * 16), ds.x * 16)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_digits_upscaled(mode: str) -> None:
    base = load_digits()
    ds = load_digits(size=16, mode=mode)
    assert ds.x.shape == (1797, 1, 16, 16)
    assert ds.x.dtype == np.float32
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    np.testing.assert_array_equal(ds.y, base.y)
    if mode == "nearest":
        # an exact 2x nearest upscale repeats every pixel in a 2x2 block
        np.testing.assert_array_equal(ds.x[:, :, ::2, ::2], base.x)
    # the mean intensity is preserved by both resamplings up to boundary effects
    assert abs(float(ds.x.mean()) - float(base.x.mean())) < 0.01


def test_digits_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        load_digits(size=0)
    with pytest.raises(ValueError, match="mode"):
        load_digits(size=16, mode="cubic")


# --------------------------------------------------------------------------- foolbox


@pytest.mark.parametrize(
    ("dataset", "shape"),
    [
        ("cifar10", (20, 3, 32, 32)),
        ("mnist", (20, 1, 28, 28)),
        ("fashionMNIST", (20, 1, 28, 28)),
        ("cifar100", (20, 3, 32, 32)),
    ],
)
def test_foolbox_samples_shapes(dataset: str, shape: tuple[int, ...]) -> None:
    ds = load_foolbox_samples(dataset)
    assert ds.x.shape == shape
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0 and ds.x.max() > 0.5
    assert len(np.unique(ds.y)) > 1


def test_foolbox_samples_mnist_labels() -> None:
    # foolbox's file names carry the labels: mnist_00_7.png, mnist_01_2.png, ...
    assert load_foolbox_samples("mnist").y[:5].tolist() == [7, 2, 1, 0, 4]


def test_foolbox_samples_index_and_errors() -> None:
    full = load_foolbox_samples("cifar10")
    part = load_foolbox_samples("cifar10", batchsize=5, index=10)
    np.testing.assert_array_equal(part.x, full.x[10:15])
    np.testing.assert_array_equal(part.y, full.y[10:15])
    with pytest.raises(ValueError, match="20 samples"):
        load_foolbox_samples("cifar10", batchsize=21)
    with pytest.raises(ValueError, match="20 samples"):
        load_foolbox_samples("cifar10", batchsize=5, index=16)
    # "MNIST" would match Fashion-MNIST's files by substring inside foolbox
    with pytest.raises(ValueError, match="unknown foolbox sample data set"):
        load_foolbox_samples("MNIST")


def test_foolbox_cifar10_equals_shared_subset(shared_dir: Path) -> None:
    ds = load_foolbox_samples("cifar10", batchsize=20)
    assert ds.x.shape == (20, 3, 32, 32)
    with np.load(shared_dir / "data" / "cifar10_subset.npz") as data:
        x_test, y_test = data["x_test"][:20], data["y_test"][:20]
    np.testing.assert_array_equal(np.round(ds.x * 255).astype(np.uint8), x_test)
    np.testing.assert_array_equal(ds.x, x_test.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.y, y_test)


# --------------------------------------------------------------------------- arrays files


def test_arrays_file_with_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, size=(7, 3, 5, 5), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(4, 3, 5, 5), dtype=np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(
        path,
        x_train=x_train,
        y_train=np.arange(7) % 2,
        x_test=x_test,
        y_test=np.arange(4, dtype=np.int32) % 2,
    )
    train = load_arrays_file(path, "train")
    test = load_arrays_file(path, split="test", num_classes=2)
    assert train.x.shape == (7, 3, 5, 5) and test.x.shape == (4, 3, 5, 5)
    assert train.x.dtype == np.float32 and test.y.dtype == np.int64
    np.testing.assert_array_equal(train.x, x_train.astype(np.float32) / 255)
    assert train.name == "toy:train" and test.num_classes == 2

    with pytest.raises(KeyError, match=r"x_val.*x_test.*x_train.*splits available"):
        load_arrays_file(path, "val")
    with pytest.raises(KeyError, match=r"no 'x' and no 'y'.*pass split"):
        load_arrays_file(path)
    with pytest.raises(FileNotFoundError, match="arrays file not found"):
        load_arrays_file(tmp_path / "missing.npz")


def test_arrays_file_plain_and_bad_contents(tmp_path: Path) -> None:
    path = tmp_path / "gray.npz"
    np.savez(path, x=np.full((3, 6, 6), 255, dtype=np.uint8), y=np.array([0, 1, 2]))
    ds = load_arrays_file(path)
    assert ds.x.shape == (3, 1, 6, 6) and float(ds.x.max()) == 1.0
    assert ds.name == "gray"

    with pytest.raises(KeyError, match="'x', 'y'"):
        load_arrays_file(path, "train")

    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.full((2, 1, 2, 2), 2.0, dtype=np.float32), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_arrays_file(bad)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, x=np.zeros((2, 1, 2, 2), dtype=np.uint8), y=np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        load_arrays_file(mismatch)


def test_shared_mnist_file(shared_dir: Path) -> None:
    ds = load_arrays_file(shared_dir / "data" / "mnist_t10k.npz", num_classes=10)
    assert ds.x.shape == (10000, 1, 28, 28)
    assert ds.y.shape == (10000,)
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    # the official test set starts 7, 2, 1, 0, 4 (as foolbox's MNIST samples do)
    assert ds.y[:5].tolist() == [7, 2, 1, 0, 4]
    fb = load_foolbox_samples("mnist")
    np.testing.assert_array_equal(ds.x[:20], fb.x)


def test_shared_cifar_file_splits(shared_dir: Path) -> None:
    path = shared_dir / "data" / "cifar10_subset.npz"
    train = load_arrays_file(path, "train", num_classes=10)
    test = load_arrays_file(path, "test", num_classes=10)
    assert train.x.shape == (4660, 3, 32, 32) and test.x.shape == (846, 3, 32, 32)
    with pytest.raises(KeyError, match=r"x_train.*y_test"):
        load_arrays_file(path, "dev")


def test_cifar10_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar10(tmp_path, train=False, download=False)


# --------------------------------------------------------------------------- validation


def test_dataset_valid_and_helpers() -> None:
    x, y = _small()
    ds = ImageDataset(x, y, "toy", num_classes=3)
    assert len(ds) == 6 and ds.image_shape == (1, 4, 4)
    assert "toy" in repr(ds)

    sub = ds.subset([4, 1])
    np.testing.assert_array_equal(sub.x, x[[4, 1]])
    np.testing.assert_array_equal(sub.y, y[[4, 1]])
    assert sub.num_classes == 3 and len(ds.subset([])) == 0

    first, rest = ds.split(4)
    assert len(first) == 4 and len(rest) == 2
    np.testing.assert_array_equal(np.concatenate([first.x, rest.x]), x)
    np.testing.assert_array_equal(rest.y, y[4:])

    sizes = [len(bx) for bx, _ in ds.batches(4)]
    assert sizes == [4, 2]
    shuffled = np.concatenate([by for _, by in ds.batches(4, shuffle=True, seed=0)])
    assert sorted(shuffled.tolist()) == sorted(y.tolist())

    tx, ty = ds.tensors()
    assert tx.dtype == torch.float32 and ty.dtype == torch.int64
    assert tuple(tx.shape) == (6, 1, 4, 4)


def test_dataset_helpers_reject_bad_arguments() -> None:
    ds = ImageDataset(*_small(), "toy")
    with pytest.raises(ValueError, match="n_first"):
        ds.split(7)
    with pytest.raises(IndexError):
        ds.subset([6])
    with pytest.raises(TypeError, match="boolean"):
        ds.subset(np.ones(6, dtype=bool))
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))


def test_dataset_is_frozen() -> None:
    ds = ImageDataset(*_small(), "toy")
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


def test_validation_wrong_dtype() -> None:
    x, y = _small()
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        ImageDataset(x.astype(np.float64), y, "toy")
    with pytest.raises(TypeError, match="y must be int64, got int32"):
        ImageDataset(x, y.astype(np.int32), "toy")
    with pytest.raises(TypeError, match="numpy arrays"):
        ImageDataset(torch.from_numpy(x), y, "toy")  # type: ignore[arg-type]


def test_validation_nan_and_range() -> None:
    x, y = _small()
    x_nan = x.copy()
    x_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ImageDataset(x_nan, y, "toy")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageDataset(x * 255, y, "toy")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageDataset(x - 0.5, y, "toy")


def test_validation_shapes_and_labels() -> None:
    x, y = _small()
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        ImageDataset(x, y[:5], "toy")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(x[:, 0], y, "toy")
    with pytest.raises(ValueError, match=r"\(N,\)"):
        ImageDataset(x, y[:, None], "toy")
    with pytest.raises(ValueError, match="non-negative"):
        ImageDataset(x, y - 1, "toy")
    with pytest.raises(ValueError, match="out of range for num_classes=2"):
        ImageDataset(x, y, "toy", num_classes=2)


def test_arrays_file_labels_must_be_indices_of_shape_n(tmp_path: Path) -> None:
    for name, y in {
        "column": np.zeros((3, 1), np.int64),
        "onehot": np.eye(3, dtype=np.int64),
    }.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, x=np.zeros((3, 4, 4), np.uint8), y=y)
        with pytest.raises(ValueError, match=r"labels must be class indices of shape \(N,\)"):
            load_arrays_file(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a readable .npz arrays file"):
        load_arrays_file(junk)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="a single array, not an .npz file"):
        load_arrays_file(single)
