"""Real image data as validated arrays: ``x`` float32 (N, C, H, W) in [0, 1], ``y`` int64 (N,).

Loaders, from always-available to network-only:

- :func:`load_digits`: the 1,797 real 8x8 handwritten digits that ship with scikit-learn
  (no download; the embedded default), optionally resized.
- :func:`load_foolbox_samples`: the 20 real test images per data set that the foolbox wheel
  ships (CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST, ImageNet).
- :func:`load_arrays_file`: an ``.npz`` file of uint8 or [0, 1] float arrays, for example the
  MNIST test set and CIFAR-10 subset kept for machines without network.
- :func:`load_cifar10`: the full CIFAR-10 through torchvision (downloads when asked).
- :func:`load_mnist`: the full MNIST through torchvision (downloads when asked).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FOOLBOX_SAMPLE_DATASETS",
    "ImageDataset",
    "arrays_file_keys",
    "load_arrays_file",
    "load_mnist",
    "load_cifar10",
    "load_digits",
    "load_foolbox_samples",
]

#: foolbox's names for the data sets whose samples its wheel ships, with their class counts.
FOOLBOX_SAMPLE_DATASETS: dict[str, int] = {
    "cifar10": 10,
    "cifar100": 100,
    "mnist": 10,
    "fashionMNIST": 10,
    "imagenet": 1000,
}
_FOOLBOX_NUM_SAMPLES = 20


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled batch of images, checked on construction.

    Attributes:
        x: float32 array (N, C, H, W) with every value finite and in [0, 1].
        y: int64 array (N,) of non-negative class indices.
        name: where the data came from (for reports).
        num_classes: the number of classes of the task, when known; every label is below it.
            It is the task's count, not the count of labels present (a subset may lack some).

    The arrays are not copied; do not modify them in place after construction.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        where = f"ImageDataset {self.name!r}"
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise TypeError(
                f"{where}: x and y must be numpy arrays, got {type(x).__name__} and "
                f"{type(y).__name__}"
            )
        if x.dtype != np.float32:
            raise TypeError(f"{where}: x must be float32, got {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{where}: x must have shape (N, C, H, W), got shape {x.shape}")
        if y.dtype != np.int64:
            raise TypeError(f"{where}: y must be int64, got {y.dtype}")
        if y.ndim != 1:
            raise ValueError(f"{where}: y must have shape (N,), got shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{where}: {x.shape[0]} images but {y.shape[0]} labels (x {x.shape}, y {y.shape})"
            )
        if x.size:
            if not np.isfinite(x).all():
                bad = int(np.count_nonzero(~np.isfinite(x)))
                raise ValueError(f"{where}: x has {bad} NaN or infinite values")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{where}: x must lie in [0, 1], found values in [{lo}, {hi}]")
        if y.size and int(y.min()) < 0:
            raise ValueError(f"{where}: labels must be non-negative, found {int(y.min())}")
        if self.num_classes is not None:
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
                raise TypeError(f"{where}: num_classes must be an int or None")
            if self.num_classes < 1:
                raise ValueError(f"{where}: num_classes must be positive, got {self.num_classes}")
            if y.size and int(y.max()) >= self.num_classes:
                raise ValueError(
                    f"{where}: label {int(y.max())} is out of range for "
                    f"num_classes={self.num_classes}"
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(
        self, indices: Sequence[int] | np.ndarray | slice, name: str | None = None
    ) -> ImageDataset:
        """The images at ``indices`` (integer positions or a slice), in that order."""
        if isinstance(indices, slice):
            x, y = self.x[indices], self.y[indices]
        else:
            idx = np.asarray(indices)
            if idx.dtype == bool:
                raise TypeError("subset takes integer positions or a slice, not a boolean mask")
            if idx.size == 0:
                idx = idx.astype(np.int64)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise TypeError(
                    f"subset takes a 1-D sequence of integers, got {idx.dtype} {idx.shape}"
                )
            if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
                raise IndexError(f"subset index out of range for {len(self)} images")
            x, y = self.x[idx], self.y[idx]
        return ImageDataset(
            np.ascontiguousarray(x),
            np.ascontiguousarray(y),
            self.name if name is None else name,
            self.num_classes,
        )

    def split(self, n_first: int) -> tuple[ImageDataset, ImageDataset]:
        """``(first n_first images, the rest)``, in order (no shuffling)."""
        if not 0 <= n_first <= len(self):
            raise ValueError(f"n_first must be in [0, {len(self)}], got {n_first}")
        first = self.subset(slice(0, n_first), name=f"{self.name}[:{n_first}]")
        rest = self.subset(slice(n_first, None), name=f"{self.name}[{n_first}:]")
        return first, rest

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x, y)`` pairs of at most ``batch_size`` images; the last may be smaller.

        With ``shuffle`` the order is a permutation drawn from ``np.random.default_rng(seed)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else None
        for start in range(0, len(self), batch_size):
            if order is None:
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield self.x[idx], self.y[idx]

    def tensors(
        self, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` as torch tensors (float32 and int64), on ``device`` when given."""
        x = torch.from_numpy(np.ascontiguousarray(self.x))
        y = torch.from_numpy(np.ascontiguousarray(self.y))
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y


def _resize(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize (N, C, H, W) float32 images to (N, C, size, size) with torch interpolation."""
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    t = torch.from_numpy(x)
    if mode == "nearest":
        out = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    # Bilinear weights are convex, so the range is kept up to rounding; clip that rounding.
    return np.ascontiguousarray(out.clamp_(0.0, 1.0).numpy(), dtype=np.float32)


def load_digits(size: int = 8, mode: str = "bilinear") -> ImageDataset:
    """The 1,797 real 8x8 handwritten digits of scikit-learn (UCI optical digits test set).

    They ship inside scikit-learn: no download. Pixel values 0..16 are scaled by 1/16.

    Args:
        size: side of the returned images; 8 keeps the originals, anything else resizes
            each image with torch's ``interpolate``.
        mode: ``"bilinear"`` (align_corners=False) or ``"nearest"``; used only when
            ``size != 8``.

    Returns:
        ``x`` float32 (1797, 1, size, size) in [0, 1], ``y`` int64 (1797,) in 0..9 (about 180
        per class, in the order scikit-learn gives).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    x = (images / 16.0).astype(np.float32)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    name = "sklearn-digits"
    if size != 8:
        x = _resize(x, size, mode)
        name = f"sklearn-digits-{size}px-{mode}"
    return ImageDataset(np.ascontiguousarray(x), y, name, num_classes=10)


def load_foolbox_samples(
    dataset: str = "cifar10", batchsize: int = 20, index: int = 0
) -> ImageDataset:
    """The real test images that the foolbox wheel ships (20 per data set).

    Calls ``foolbox.utils.samples`` without a model (``fmodel=None``, with
    ``data_format="channels_first"`` and ``bounds=(0, 1)`` given explicitly), which returns
    numpy arrays. ImageNet images are resized by foolbox to 224x224.

    Args:
        dataset: foolbox's name: ``"cifar10"``, ``"cifar100"``, ``"mnist"``, ``"fashionMNIST"``
            or ``"imagenet"`` (case matters, as in foolbox's file names).
        batchsize: how many images, from ``index`` on.
        index: the first image; ``index + batchsize`` may not exceed 20 (foolbox would
            silently repeat images).

    Returns:
        ``x`` float32 (batchsize, C, H, W) in [0, 1] (C, H, W = 3, 32, 32 for CIFAR, 1, 28, 28
        for (Fashion-)MNIST, 3, 224, 224 for ImageNet), ``y`` int64 (batchsize,).
    """
    if dataset not in FOOLBOX_SAMPLE_DATASETS:
        # Checked here: foolbox matches file names by substring, so e.g. "MNIST" would
        # silently pick Fashion-MNIST images and an unknown name raises a bare IndexError.
        raise ValueError(
            f"unknown foolbox sample data set {dataset!r}; choose one of "
            f"{sorted(FOOLBOX_SAMPLE_DATASETS)}"
        )
    if batchsize < 1 or index < 0 or index + batchsize > _FOOLBOX_NUM_SAMPLES:
        raise ValueError(
            f"foolbox ships {_FOOLBOX_NUM_SAMPLES} samples per data set: need batchsize >= 1, "
            f"index >= 0 and index + batchsize <= {_FOOLBOX_NUM_SAMPLES}, got index={index}, "
            f"batchsize={batchsize}"
        )
    try:
        import PIL  # noqa: F401  (foolbox's samples import it lazily)
    except ImportError as err:  # pragma: no cover - Pillow is a declared dependency
        raise ImportError("foolbox's samples need Pillow: pip install Pillow") from err
    with warnings.catch_warnings():
        # foolbox imports scipy.ndimage.filters (deprecated) and, without a model, warns
        # that it returns numpy arrays, which is what we want.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="unknown model type", category=UserWarning)
        from foolbox.types import Bounds
        from foolbox.utils import samples

        no_model: Any = None  # foolbox's signature wants a Model; None works with both given
        images, labels = samples(
            no_model,
            dataset=dataset,
            index=index,
            batchsize=batchsize,
            data_format="channels_first",
            bounds=Bounds(0.0, 1.0),
        )
    x = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    y = np.asarray(labels).astype(np.int64)
    name = f"foolbox-samples-{dataset}[{index}:{index + batchsize}]"
    return ImageDataset(x, y, name, num_classes=FOOLBOX_SAMPLE_DATASETS[dataset])


def _to_unit_float(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 -> float32 / 255; float arrays must already lie in [0, 1]."""
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    raise TypeError(f"{what}: images must be uint8 (0..255) or float in [0, 1], got {x.dtype}")


def arrays_file_keys(path: str | Path) -> list[str]:
    """The array names in an ``.npz`` file, sorted.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable ``.npz`` archive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"arrays file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:  # zipfile, pickle and format errors alike: one clear message
        raise ValueError(f"{path}: not a readable .npz arrays file ({error})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not an .npz file of named arrays (x, y, ...)")
    with data:
        return sorted(data.files)


def load_arrays_file(
    path: str | Path,
    split: str | None = None,
    name: str | None = None,
    num_classes: int | None = None,
) -> ImageDataset:
    """Images and labels from an ``.npz`` file.

    The file holds either ``x`` and ``y`` (``split=None``), or ``x_<split>`` and ``y_<split>``
    for each split (e.g. ``x_train``, ``y_train``, ``x_test``, ``y_test``; choose with
    ``split="train"``). Images are (N, C, H, W), or (N, H, W) for one channel; uint8 values
    are divided by 255, float values must already lie in [0, 1]. Labels are integers (N,)
    (any other shape is refused, not reshaped).

    Args:
        path: the ``.npz`` file.
        split: which ``x_<split>``/``y_<split>`` pair to read; ``None`` reads ``x``/``y``.
        name: the data set's name for reports; default ``"<file stem>"`` or
            ``"<file stem>:<split>"``.
        num_classes: the task's class count, when known (checked against the labels).

    Returns:
        ``x`` float32 (N, C, H, W) in [0, 1], ``y`` int64 (N,).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable ``.npz`` file, or arrays of the wrong shape or range.
        KeyError: the file lacks the requested arrays; the message lists the keys it has.
    """
    path = Path(path)
    keys = arrays_file_keys(path)
    x_key, y_key = ("x", "y") if split is None else (f"x_{split}", f"y_{split}")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in (x_key, y_key) if k not in keys]
        if missing:
            splits = sorted(k[2:] for k in keys if k.startswith("x_") and f"y_{k[2:]}" in keys)
            hint = f"; splits available: {splits}" if splits else ""
            if split is None and splits:
                hint += " (pass split=...)"
            raise KeyError(
                f"{path.name}: no {' and no '.join(repr(k) for k in missing)} "
                f"(split={split!r}); the file has keys {keys}{hint}"
            )
        x_raw, y_raw = data[x_key], data[y_key]
    what = f"{path.name}[{x_key!r}]"
    if x_raw.ndim == 3:
        x_raw = x_raw[:, None, :, :]
    if x_raw.ndim != 4:
        raise ValueError(f"{what}: expected images (N, C, H, W) or (N, H, W), got {x_raw.shape}")
    labels = f"{path.name}[{y_key!r}]"
    if not np.issubdtype(y_raw.dtype, np.integer):
        raise TypeError(f"{labels}: labels must be integers, got {y_raw.dtype}")
    if y_raw.ndim != 1:
        raise ValueError(
            f"{labels}: labels must be class indices of shape (N,), got {y_raw.shape} "
            "(save y.reshape(-1) if these are indices, argmax(1) if one-hot)"
        )
    x = np.ascontiguousarray(_to_unit_float(x_raw, what))
    y = np.ascontiguousarray(y_raw)
    if name is None:
        name = path.stem if split is None else f"{path.stem}:{split}"
    return ImageDataset(x, y.astype(np.int64), name, num_classes=num_classes)


def load_cifar10(
    root: str | Path, train: bool = False, download: bool = False, limit: int | None = None
) -> ImageDataset:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (50,000 train / 10,000 test images).

    Args:
        root: the folder that holds (or will hold) ``cifar-10-batches-py``.
        train: the training set when True, else the test set.
        download: fetch the archive (about 170 MB) when it is absent; needs network.
        limit: keep only the first ``limit`` images (in the official order).

    Returns:
        ``x`` float32 (N, 3, 32, 32) in [0, 1], ``y`` int64 (N,) in 0..9.
    """
    from torchvision.datasets import CIFAR10

    root = Path(root)
    ds = _torchvision_set(CIFAR10, "CIFAR-10", root / "cifar-10-batches-py", root, train, download)
    data = np.asarray(ds.data).transpose(0, 3, 1, 2)  # (N, 32, 32, 3) uint8 -> (N, 3, 32, 32)
    return _uint8_dataset(data, np.asarray(ds.targets), "cifar10", train, limit)


def load_mnist(
    root: str | Path, train: bool = False, download: bool = False, limit: int | None = None
) -> ImageDataset:
    """MNIST through ``torchvision.datasets.MNIST`` (60,000 train / 10,000 test images).

    Args:
        root: the folder that holds (or will hold) ``MNIST/raw`` (torchvision's layout).
        train: the training set when True, else the test set.
        download: fetch the archives (about 12 MB) when they are absent; needs network.
        limit: keep only the first ``limit`` images (in the official order).

    Returns:
        ``x`` float32 (N, 1, 28, 28) in [0, 1], ``y`` int64 (N,) in 0..9.
    """
    from torchvision.datasets import MNIST

    root = Path(root)
    ds = _torchvision_set(MNIST, "MNIST", root / "MNIST" / "raw", root, train, download)
    return _uint8_dataset(ds.data.numpy()[:, None], ds.targets.numpy(), "mnist", train, limit)


def _torchvision_set(
    cls: Any, title: str, expected: Path, root: Path, train: bool, download: bool
) -> Any:
    """``cls(root, train, download)`` (a torchvision data set), or a FileNotFoundError naming
    ``expected`` when it is absent and ``download`` is off."""
    try:
        return cls(root=str(root), train=train, download=download)
    except RuntimeError as err:
        if download:
            raise
        raise FileNotFoundError(
            f"{title} not found under {root} (expected {expected}); pass download=True to "
            "fetch it, or use load_arrays_file on a local .npz"
        ) from err


def _uint8_dataset(
    data: np.ndarray, targets: np.ndarray, name: str, train: bool, limit: int | None
) -> ImageDataset:
    """Images (N, C, H, W) uint8 and labels as an ``ImageDataset`` in [0, 1] of 10 classes,
    the first ``limit`` of them (all when None), named ``name:train`` or ``name:test``."""
    targets = targets.astype(np.int64)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        data, targets = data[:limit], targets[:limit]
    x = np.ascontiguousarray(data.astype(np.float32) / np.float32(255.0))
    split = "train" if train else "test"
    return ImageDataset(x, targets, f"{name}:{split}", num_classes=10)
