"""A small single-scale convolutional DEQ that trains in seconds on a CPU.

Parts for `DEQ` (C = channels, s = side of the feature map, see `feature_side`):

- injection: x (B, in_channels, H, W) -> inj (B, C, s, s): 3x3 convolution (stride 2 for
  images of side >= 16) and GroupNorm;
- f: (z, inj) -> z_next, both (B, C, s, s): MDEQ's residual block,
  z_next = GN3(ReLU(GN2(drop(conv2(ReLU(GN1(conv1(z))))) + inj) + z));
- head: z (B, C, s, s) -> logits: stride-2 3x3 convolution to 2C channels, GroupNorm, ReLU,
  average pooling to at most 4x4 positions, linear classifier.

The block's convolutions start at N(0, 0.01) (MDEQ's initialisation), which makes f a
contraction at init: fixed-point iteration from zero converges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from deq_attacks.deq.dropout import VariationalDropout
from deq_attacks.models.registry import register_model

if TYPE_CHECKING:
    from deq_attacks.deq.model import DEQ

_GROUPS = 4
_POOL = 4


def _stem_stride(image_size: int) -> int:
    return 2 if image_size >= 16 else 1


def feature_side(image_size: int) -> int:
    """Side s of the state's feature map for square images of side image_size."""
    stride = _stem_stride(image_size)
    return (image_size - 1) // stride + 1


class ConvInjection(nn.Module):
    """x (B, in_channels, H, W) -> inj (B, C, s, s)."""

    def __init__(self, in_channels: int, channels: int, image_size: int) -> None:
        super().__init__()
        stride = _stem_stride(image_size)
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(_GROUPS, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class ConvLayer(nn.Module):
    """f_theta: (z (B, C, s, s), inj (B, C, s, s)) -> (B, C, s, s), MDEQ's residual block."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, 0.01)
        self.gn1 = nn.GroupNorm(_GROUPS, channels)
        self.gn2 = nn.GroupNorm(_GROUPS, channels)
        self.gn3 = nn.GroupNorm(_GROUPS, channels)
        self.drop = VariationalDropout(dropout)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        out = torch.relu(self.gn1(self.conv1(z)))
        out = self.gn2(self.drop(self.conv2(out)) + inj)
        return self.gn3(torch.relu(out + z))


class ConvHead(nn.Module):
    """z (B, C, s, s) -> logits (B, num_classes)."""

    def __init__(self, channels: int, num_classes: int, side: int) -> None:
        super().__init__()
        pooled = min(_POOL, (side - 1) // 2 + 1)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(_GROUPS, 2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * channels * pooled * pooled, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(self.features(z))


def conv_deq_parts(
    in_channels: int,
    num_classes: int,
    channels: int = 16,
    image_size: int = 28,
    dropout: float = 0.0,
) -> tuple[ConvInjection, ConvLayer, ConvHead]:
    """Build (injection, f, head) of the small conv DEQ for square images of side image_size.

    channels must be a positive multiple of 4 (GroupNorm with 4 groups); dropout is the
    variational dropout probability inside f.
    """
    if channels <= 0 or channels % _GROUPS:
        raise ValueError(f"channels must be a positive multiple of {_GROUPS}, got {channels}")
    if in_channels <= 0 or num_classes <= 0 or image_size <= 0:
        raise ValueError("in_channels, num_classes and image_size must be positive")
    return (
        ConvInjection(in_channels, channels, image_size),
        ConvLayer(channels, dropout),
        ConvHead(channels, num_classes, feature_side(image_size)),
    )


@register_model
def small_conv_deq(
    in_channels: int = 1,
    num_classes: int = 10,
    channels: int = 16,
    image_size: int = 28,
    dropout: float = 0.0,
    **deq_kwargs: Any,
) -> DEQ:
    """The small conv DEQ as a `DEQ` for images (in_channels, image_size, image_size), its
    declared ``input_shape``; deq_kwargs go to `DEQ` (solver and gradient settings)."""
    from deq_attacks.deq.model import DEQ

    injection, f, head = conv_deq_parts(in_channels, num_classes, channels, image_size, dropout)
    shape = (in_channels, image_size, image_size)
    return DEQ(f=f, injection=injection, head=head, input_shape=shape, **deq_kwargs)
