"""Training data: the training set (augmented, through a torch DataLoader) and a development
split held out from it for checkpoint choice (Appendix A; the reference code chose on the test
set, we never touch it).

- ``cifar10``: torchvision's CIFAR-10 training set (50,000 images) with RandomCrop(32,
  padding=4) and RandomHorizontalFlip, as the reference code; the dev split comes from it.
- ``digits`` or an ``.npz`` arrays file: ``deq_attacks.splits.training_pool`` (the first 1,200
  digits, the file's ``x_train``/``y_train``, else its first 80%); the rest is held out for
  evaluation by the same module's rule.
- ``memory``: arrays in memory, ``run_training(config, run_dir, data=ImageDataset or (x, y))``
  (x float32 (N, C, H, W) in [0, 1], y int64 (N,), numpy or torch): the whole of them is the
  training pool, through the same split, augmentation and batches.

The pool's contents are fingerprinted (SHA-256 of the images and labels): a run folder records
it and refuses to resume on other data.

Batches are global: every epoch draws one permutation from a generator seeded by (seed, epoch),
cuts it into global batches of ``batch_size`` (the last, incomplete one is dropped) and gives
rank r of W the r-th contiguous slice of each. One process and W processes thus see the same
global batches, and a resumed run the same order as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from deq_attacks.data import ImageDataset
from deq_attacks.splits import training_pool, training_split
from deq_attacks.training.config import MEMORY_DATA, TrainConfig

#: What ``run_training(..., data=...)`` takes: a validated data set or an (images, labels) pair.
TrainingArrays = ImageDataset | tuple[np.ndarray | Tensor, np.ndarray | Tensor]


class TensorImages(Dataset[tuple[Tensor, Tensor]]):
    """Images (N, C, H, W) float in [0, 1] and labels (N,), with a per-item transform."""

    def __init__(self, x: Tensor, y: Tensor, transform: transforms.Compose | None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.x[index]
        return (self.transform(image) if self.transform is not None else image), self.y[index]


@dataclass
class TrainingData:
    """The augmented training set, the dev split as tensors, the task's shape, and the
    fingerprint of the pool both came from (``name``, image count, SHA-256)."""

    train: Dataset[tuple[Tensor, Tensor]]
    dev_x: Tensor
    dev_y: Tensor
    image_shape: tuple[int, int, int]
    num_classes: int
    name: str
    fingerprint: dict[str, object]

    def __len__(self) -> int:
        return len(self.train)  # type: ignore[arg-type]


def augmentation(config: TrainConfig, side: int) -> list[torch.nn.Module]:
    """RandomCrop(side, padding) and RandomHorizontalFlip as the config asks."""
    out: list[torch.nn.Module] = []
    if config.data.crop_padding > 0:
        out.append(transforms.RandomCrop(side, padding=config.data.crop_padding))
    if config.data.flip:
        out.append(transforms.RandomHorizontalFlip())
    return out


def fingerprint(name: str, *arrays: np.ndarray) -> dict[str, object]:
    """``name``, the number of items and the SHA-256 of the arrays' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return {"name": name, "images": int(len(arrays[0])), "sha256": digest.hexdigest()}


def _cifar10(config: TrainConfig) -> TrainingData:
    from torchvision.datasets import CIFAR10

    root = Path(config.data.data_root)
    train_tf = transforms.Compose([*augmentation(config, 32), transforms.ToTensor()])
    try:
        augmented = CIFAR10(
            str(root), train=True, download=config.data.download, transform=train_tf
        )
    except RuntimeError as error:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root} (expected {root / 'cifar-10-batches-py'}): pass "
            "--download true to fetch it, or --data-root to where it is"
        ) from error
    train_idx, dev_idx = training_split(
        len(augmented), config.data.dev_size, config.data.train_limit
    )
    dev_x = torch.from_numpy(augmented.data[dev_idx]).permute(0, 3, 1, 2).float() / 255.0
    dev_y = torch.as_tensor(np.asarray(augmented.targets)[dev_idx], dtype=torch.int64)
    return TrainingData(
        torch.utils.data.Subset(augmented, train_idx.tolist()),
        dev_x.contiguous(),
        dev_y,
        (3, 32, 32),
        10,
        "cifar10:train",
        fingerprint("cifar10:train", augmented.data, np.asarray(augmented.targets)),
    )


def as_image_dataset(data: TrainingArrays) -> ImageDataset:
    """``data`` as a validated ImageDataset (an (x, y) pair of numpy arrays or tensors is
    checked as the data layer checks every source: float32 (N, C, H, W) in [0, 1], int64
    labels (N,); nothing is converted)."""
    if isinstance(data, ImageDataset):
        return data
    if not isinstance(data, tuple) or len(data) != 2:
        raise TypeError(
            f"data must be an ImageDataset or an (x, y) pair of arrays, got {type(data).__name__}"
        )
    x, y = (v.detach().cpu().numpy() if isinstance(v, Tensor) else v for v in data)
    return ImageDataset(np.asarray(x), np.asarray(y), MEMORY_DATA)


def _from_pool(config: TrainConfig, pool: ImageDataset) -> TrainingData:
    """The split, augmentation and fingerprint of an in-memory pool."""
    train_idx, dev_idx = training_split(len(pool), config.data.dev_size, config.data.train_limit)
    x, y = torch.from_numpy(pool.x), torch.from_numpy(pool.y)
    steps = augmentation(config, pool.x.shape[-1])
    train = TensorImages(x[train_idx], y[train_idx], transforms.Compose(steps) if steps else None)
    num_classes = pool.num_classes or int(pool.y.max()) + 1
    return TrainingData(
        train,
        x[dev_idx],
        y[dev_idx],
        pool.image_shape,
        num_classes,
        pool.name,
        fingerprint(pool.name, pool.x, pool.y),
    )


def load_training_data(config: TrainConfig, data: TrainingArrays | None = None) -> TrainingData:
    """The training set and dev split that ``config.data.source`` names (with ``data="memory"``, the
    arrays ``data``); raises ValueError before any work when the two disagree."""
    if config.data.source == MEMORY_DATA:
        if data is None:
            raise ValueError(
                "data='memory' trains on the arrays passed as run_training(config, run_dir, "
                "data=...); none were given"
            )
        return _from_pool(config, as_image_dataset(data))
    if data is not None:
        raise ValueError(
            f"the config names its data ({config.data.source!r}); arrays passed to run_training "
            "are used only with data.source='memory'"
        )
    if config.data.source == "cifar10":
        return _cifar10(config)
    return _from_pool(config, training_pool(config.data.source))


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's slice of each global batch of one epoch (see the module docstring)."""

    def __init__(
        self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
    ) -> None:
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is not divisible by {world} processes")
        if n < batch_size:
            raise ValueError(f"{n} training images are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        local = self.batch_size // self.world
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * local
            yield order[start : start + local]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order (and of its loader workers)."""
    return seed * 100_003 + epoch


def epoch_loader(
    data: TrainingData, config: TrainConfig, epoch: int, rank: int, world: int, pin: bool
) -> DataLoader[tuple[Tensor, Tensor]]:
    """The DataLoader of one epoch for one rank; its workers are seeded from the epoch too."""
    sampler = GlobalBatchSampler(
        len(data), config.optimiser.batch_size, config.execution.seed, epoch, rank, world
    )
    return DataLoader(
        data.train,
        batch_sampler=sampler,
        num_workers=config.execution.num_workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(
            epoch_seed(config.execution.seed, epoch) + 7919 * rank
        ),
        persistent_workers=False,
    )
