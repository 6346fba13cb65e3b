"""ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant): a Table 4 baseline.

The CIFAR variant used by the adversarial-training literature (Madry et al., Rice et al.,
RobustBench): a 3x3 stem without max pooling, four stages of two BasicBlocks with
64/128/256/512 channels (stride 1, 2, 2, 2), BatchNorm, global average pooling, a linear
classifier. About 11.2M parameters for 10 classes. Input (B, in_channels, H, W) in [0, 1],
output logits (B, num_classes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deq_attacks.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks; ``blocks`` per stage, widths ``width * (1, 2, 4, 8)``."""

    def __init__(
        self, blocks: tuple[int, ...], num_classes: int, in_channels: int, width: int = 64
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError("num_classes, in_channels and width must be positive")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        c_in = width
        for i, count in enumerate(blocks):
            c_out = width * 2**i
            for j in range(count):
                stages.append(BasicBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        return self.classifier(features.mean(dim=(2, 3)))


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18 (CIFAR variant); ``width`` scales every stage (64 is the standard model)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)
