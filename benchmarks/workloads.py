"""The models and batches the benchmarks run on, and the iteration counts they use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deq_attacks import DEQ
from deq_attacks.models import deq_large, small_conv_deq


@dataclass(frozen=True)
class Settings:
    """Iteration counts and repetition policy of one run of the suite.

    threshold: forward solver iterates N (paper: 8). long_threshold: the long solve of the
    memory ratio (50). backward_threshold: the exact training gradient's backward solve (7).
    phantom_k, phantom_lam: the phantom training gradient (5, 0.5). pgd_steps: PGD iterations
    (10). repeats: timed repetitions per ratio (median reported). warmup: untimed calls per
    side first. min_block_s: short calls are repeated until one timed block lasts this long.
    clock: "wall" or "cpu" (see ``benchmarks.timing``). scaling_thresholds, scaling_batches:
    the grid of the scaling case (N 8, 16, 32; B 16, 64, 256).
    """

    threshold: int = 8
    long_threshold: int = 50
    backward_threshold: int = 7
    phantom_k: int = 5
    phantom_lam: float = 0.5
    pgd_steps: int = 10
    repeats: int = 5
    warmup: int = 1
    min_block_s: float = 0.3
    clock: str = "wall"
    scaling_thresholds: tuple[int, ...] = (8, 16, 32)
    scaling_batches: tuple[int, ...] = (16, 64, 256)

    @classmethod
    def quick(cls, repeats: int, clock: str = "wall") -> Settings:
        """A smoke run: fewer iterations, no warm-up, one call per timed block."""
        return cls(
            threshold=3,
            long_threshold=6,
            backward_threshold=2,
            phantom_k=2,
            pgd_steps=2,
            repeats=repeats,
            warmup=0,
            min_block_s=0.0,
            clock=clock,
            scaling_thresholds=(2, 4),
            scaling_batches=(2, 4),
        )


@dataclass(frozen=True)
class Workload:
    """A model builder and a batch shape.

    name: "small" or "large". description: one line for the table. batch: batch size.
    input_shape: one input (C, H, W). build: ``build(**deq_kwargs) -> DEQ``.
    """

    name: str
    description: str
    batch: int
    input_shape: tuple[int, int, int]
    build: Callable[..., DEQ]
    num_classes: int = 10

    def model(self, device: torch.device, seed: int = 0, **deq_kwargs: Any) -> DEQ:
        """A freshly initialised DEQ (seeded) in eval mode on ``device``."""
        torch.manual_seed(seed)
        return self.build(**deq_kwargs).to(device).eval()

    def batch_data(self, device: torch.device, seed: int = 1) -> tuple[Tensor, Tensor]:
        """Inputs (B, C, H, W) uniform in [0, 1] and labels (B,) on ``device``."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(self.batch, *self.input_shape, generator=gen)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=gen)
        return x.to(device), y.to(device)


def _small(**deq_kwargs: Any) -> DEQ:
    return small_conv_deq(in_channels=3, num_classes=10, channels=16, image_size=32, **deq_kwargs)


def _tiny(**deq_kwargs: Any) -> DEQ:
    return small_conv_deq(in_channels=3, num_classes=10, channels=8, image_size=16, **deq_kwargs)


def workloads(quick: bool) -> dict[str, Workload]:
    """The workloads by name; ``quick`` shrinks the small one for a smoke run."""
    if quick:
        small = Workload(
            "small", "small conv DEQ, 8 channels, 16x16 RGB (quick smoke)", 4, (3, 16, 16), _tiny
        )
    else:
        small = Workload(
            "small",
            "small conv DEQ (16 channels, state 16x16x16), CIFAR-shaped batch 64x3x32x32",
            64,
            (3, 32, 32),
            _small,
        )
    large = Workload(
        "large",
        "DEQ-Large (MDEQ, 4 scales, 11.1M parameters), batch 2x3x32x32",
        2,
        (3, 32, 32),
        deq_large,
    )
    return {"small": small, "large": large}
