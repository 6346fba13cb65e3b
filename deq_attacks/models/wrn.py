"""Wide ResNet (Zagoruyko & Komodakis 2016) for 32x32 inputs: WRN-34-10, a Table 4 baseline.

Pre-activation blocks (BatchNorm, ReLU, 3x3 convolution, twice) in three groups of
(depth - 4) / 6 blocks with 16k, 32k, 64k channels (k = widen factor; stride 1, 2, 2), after a
16-channel 3x3 stem; BatchNorm, ReLU, global average pooling, linear classifier. WRN-34-10 (the
model of Madry et al. and TRADES) has about 46.2M parameters. Input (B, C, H, W) in [0, 1],
output logits (B, num_classes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deq_attacks.models.registry import register_model


class WideBlock(nn.Module):
    """Pre-activation residual block; a 1x1 projection where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.projection: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.projection = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        shortcut = x if self.projection is None else self.projection(pre)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError("widen, num_classes and in_channels must be positive")
        per_group = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = 16
        for i, c_out in enumerate(widths):
            for j in range(per_group):
                blocks.append(WideBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.classifier(out.mean(dim=(2, 3)))


@register_model
def wrn34_10(num_classes: int = 10, in_channels: int = 3, widen: int = 10) -> WideResNet:
    """WRN-34-10 (``widen`` other than 10 gives WRN-34-k, e.g. a small model for tests)."""
    return WideResNet(34, widen, num_classes, in_channels)
