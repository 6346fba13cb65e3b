"""Training data: the training set (augmented, through a torch DataLoader) and a development
split held out from it for checkpoint choice (Appendix A; the reference code chose on the test
set, we never touch it).

- ``cifar10``: torchvision's CIFAR-10 training set (50,000 images) with RandomCrop(32,
  padding=4) and RandomHorizontalFlip, as the reference code; the dev split comes from it.
- ``digits``: the embedded 8x8 digits; the first 1,200 are the training pool (the rest stay
  for testing, as in ``deq-attacks demo``).
- an ``.npz`` arrays file: its ``x_train``/``y_train`` when present, else its first 80%.

Batches are global: every epoch draws one permutation from a generator seeded by (seed, epoch),
cuts it into global batches of ``batch_size`` (the last, incomplete one is dropped) and gives
rank r of W the r-th contiguous slice of each. One process and W processes thus see the same
global batches, and a resumed run the same order as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from deq_attacks.data import ImageDataset, load_arrays_file, load_digits
from deq_attacks.training.config import TrainConfig

#: Images of the embedded digits used for training (the rest are the demo's test pool).
DIGITS_TRAIN_POOL = 1200
#: Seed of the (fixed) development split: it must not move with the training seed.
DEV_SPLIT_SEED = 20221128


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
    """The augmented training set, the dev split as tensors, and the task's shape."""

    train: Dataset[tuple[Tensor, Tensor]]
    dev_x: Tensor
    dev_y: Tensor
    image_shape: tuple[int, int, int]
    num_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.train)  # type: ignore[arg-type]


def augmentation(config: TrainConfig, side: int) -> list[torch.nn.Module]:
    """RandomCrop(side, padding) and RandomHorizontalFlip as the config asks."""
    out: list[torch.nn.Module] = []
    if config.crop_padding > 0:
        out.append(transforms.RandomCrop(side, padding=config.crop_padding))
    if config.flip:
        out.append(transforms.RandomHorizontalFlip())
    return out


def _split_indices(n: int, dev_size: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) indices of a pool of n: dev is a fixed random subset, train the rest (its
    first ``limit`` only, when given)."""
    if dev_size >= n:
        raise ValueError(f"dev_size={dev_size} leaves no training images out of {n}")
    order = np.random.default_rng(DEV_SPLIT_SEED).permutation(n)
    dev, train = np.sort(order[:dev_size]), np.sort(order[dev_size:])
    if limit is not None:
        train = train[:limit]
    return train, dev


def _cifar10(config: TrainConfig) -> TrainingData:
    from torchvision.datasets import CIFAR10

    root = Path(config.data_root)
    train_tf = transforms.Compose([*augmentation(config, 32), transforms.ToTensor()])
    try:
        augmented = CIFAR10(str(root), train=True, download=config.download, transform=train_tf)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root} (expected {root / 'cifar-10-batches-py'}): pass "
            "--download true to fetch it, or --data-root to where it is"
        ) from error
    train_idx, dev_idx = _split_indices(len(augmented), config.dev_size, config.train_limit)
    dev_x = torch.from_numpy(augmented.data[dev_idx]).permute(0, 3, 1, 2).float() / 255.0
    dev_y = torch.as_tensor(np.asarray(augmented.targets)[dev_idx], dtype=torch.int64)
    return TrainingData(
        torch.utils.data.Subset(augmented, train_idx.tolist()),
        dev_x.contiguous(),
        dev_y,
        (3, 32, 32),
        10,
        "cifar10:train",
    )


def _arrays(config: TrainConfig) -> TrainingData:
    pool: ImageDataset
    if config.data == "digits":
        pool = load_digits().split(DIGITS_TRAIN_POOL)[0]
    else:
        path = Path(config.data)
        with np.load(path) as arrays:
            has_split = "x_train" in arrays.files
        if has_split:
            pool = load_arrays_file(path, split="train")
        else:
            everything = load_arrays_file(path)
            pool = everything.split(int(0.8 * len(everything)))[0]
    train_idx, dev_idx = _split_indices(len(pool), config.dev_size, config.train_limit)
    x, y = torch.from_numpy(pool.x), torch.from_numpy(pool.y)
    side = pool.x.shape[-1]
    steps = augmentation(config, side)
    train = TensorImages(x[train_idx], y[train_idx], transforms.Compose(steps) if steps else None)
    num_classes = pool.num_classes or int(pool.y.max()) + 1
    shape = tuple(int(s) for s in pool.x.shape[1:])
    return TrainingData(train, x[dev_idx], y[dev_idx], shape, num_classes, pool.name)  # type: ignore[arg-type]


def load_training_data(config: TrainConfig) -> TrainingData:
    """The training set and dev split that ``config.data`` names."""
    if config.data == "cifar10":
        return _cifar10(config)
    if config.data != "digits" and not Path(config.data).is_file():
        raise FileNotFoundError(f"arrays file not found: {config.data}")
    return _arrays(config)


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
    sampler = GlobalBatchSampler(len(data), config.batch_size, config.seed, epoch, rank, world)
    return DataLoader(
        data.train,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch) + 7919 * rank),
        persistent_workers=False,
    )
