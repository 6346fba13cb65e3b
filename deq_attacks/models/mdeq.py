"""Multiscale deep equilibrium model (MDEQ, Bai et al. 2020) for 32x32 classification.

The model is split into the three parts a `DEQ` consumes:

- injection (stem): x (B, in_channels, H, W) -> inj (B, C_0, H_0, W_0), the input injection
  of the highest-resolution scale (MDEQ injects into that scale only; the others get zero);
- f: (z, inj) -> z_next, where z is ONE flat tensor (B, d) holding all scales packed
  (scale i has shape (C_i, H_0 / 2^i, W_0 / 2^i));
- head: z (B, d) -> logits (B, num_classes), the HRNet-style classification head.

Structure follows MDEQ's classification model: per-scale residual block (two 3x3 convolutions,
the inner one `expansion` times wider, GroupNorm, weight norm, variational dropout), multiscale
fusion (strided 3x3 convolutions down, 1x1 convolution + nearest upsampling up), then ReLU,
weight-normed 1x1 convolution and GroupNorm per scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from deq_attacks.deq.dropout import VariationalDropout
from deq_attacks.models.registry import register_model

if TYPE_CHECKING:
    from deq_attacks.deq.model import DEQ


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class MDEQConfig:
    """Hyperparameters of an MDEQ classifier.

    channels: channels of each scale, highest resolution first (one entry per scale).
    head_channels: bottleneck width of the head per scale (its output is 4x that).
    final_channels: channels of the head's last 1x1 convolution, before global pooling.
    expansion: width factor of the inner convolution of each residual block.
    num_groups: GroupNorm groups in f (the post-fusion GroupNorm uses num_groups // 2).
    dropout: variational dropout probability in each residual block, in [0, 1).
    weight_norm: weight-normalise the convolutions of the blocks and of the post-fusion step.
    post_gn_affine: learnable affine parameters in the post-fusion GroupNorm.
    downsample_times: stride-2 convolutions in the stem (0 for 32x32 CIFAR inputs).
    """

    channels: tuple[int, ...]
    head_channels: tuple[int, ...]
    final_channels: int
    expansion: int = 5
    num_groups: int = 8
    dropout: float = 0.0
    weight_norm: bool = True
    post_gn_affine: bool = False
    downsample_times: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "head_channels", tuple(self.head_channels))
        if not self.channels:
            raise ValueError("channels must name at least one scale")
        if len(self.head_channels) != len(self.channels):
            raise ValueError(
                f"head_channels has {len(self.head_channels)} entries but channels has "
                f"{len(self.channels)}; give one per scale"
            )
        for name, values in (("channels", self.channels), ("head_channels", self.head_channels)):
            if not all(_is_positive_int(v) for v in values):
                raise ValueError(f"{name} must be positive ints, got {values}")
        for name in ("final_channels", "expansion", "num_groups"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_groups < 2:
            raise ValueError("num_groups must be >= 2 (post-fusion uses num_groups // 2)")
        for c in self.channels:
            if c % self.num_groups or c % (self.num_groups // 2):
                raise ValueError(
                    f"every scale's channels must be divisible by num_groups={self.num_groups} "
                    f"and by num_groups // 2; {c} is not"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.downsample_times, int) or self.downsample_times < 0:
            raise ValueError(f"downsample_times must be an int >= 0, got {self.downsample_times}")

    @property
    def num_scales(self) -> int:
        """Number of resolutions (branches)."""
        return len(self.channels)


# DEQ-Large and DEQ-XL of Table 7 (MDEQ's cls_mdeq_LARGE_reg CIFAR-10 settings for the rest:
# expansion 5, 8 groups, dropout 0.22, weight norm, no affine post-fusion GroupNorm).
MDEQ_LARGE = MDEQConfig(
    channels=(32, 64, 128, 256),
    head_channels=(14, 28, 56, 112),
    final_channels=1680,
    dropout=0.22,
)
MDEQ_XL = MDEQConfig(
    channels=(72, 144, 288, 576),
    head_channels=(20, 40, 80, 160),
    final_channels=1800,
    dropout=0.22,
)


@dataclass(frozen=True)
class ScaleLayout:
    """Shapes (C_i, H_i, W_i) of the scales packed, in order, into one flat state (B, d)."""

    shapes: tuple[tuple[int, int, int], ...]

    @property
    def dim(self) -> int:
        """d: the length of the flat state per sample."""
        return sum(c * h * w for c, h, w in self.shapes)

    def pack(self, zs: Sequence[Tensor]) -> Tensor:
        """List of (B, C_i, H_i, W_i) tensors -> one (B, d) tensor."""
        return torch.cat([z.flatten(1) for z in zs], dim=1)

    def unpack(self, z: Tensor) -> list[Tensor]:
        """(B, d) -> list of (B, C_i, H_i, W_i) tensors (views where possible)."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"expected a packed state of shape (B, {self.dim}), got {tuple(z.shape)}"
            )
        sizes = [c * h * w for c, h, w in self.shapes]
        return [
            part.reshape(z.shape[0], *shape)
            for part, shape in zip(torch.split(z, sizes, dim=1), self.shapes, strict=True)
        ]


def mdeq_layout(config: MDEQConfig, image_size: int) -> ScaleLayout:
    """The state layout of `config` for square inputs of side `image_size`."""
    side = image_size
    for _ in range(config.downsample_times):
        if side % 2:
            raise ValueError(f"image_size {image_size} is not divisible by 2^downsample_times")
        side //= 2
    if side % 2 ** (config.num_scales - 1):
        raise ValueError(
            f"the stem's output side {side} must be divisible by 2^(num_scales - 1) = "
            f"{2 ** (config.num_scales - 1)}"
        )
    return ScaleLayout(tuple((c, side >> i, side >> i) for i, c in enumerate(config.channels)))


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def _maybe_weight_norm(conv: nn.Conv2d, enabled: bool) -> nn.Conv2d:
    return weight_norm(conv, name="weight", dim=0) if enabled else conv


def _init_plain_convs(module: nn.Module) -> None:
    """MDEQ's initialisation: N(0, 0.01) for every convolution that is not weight-normed."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and not parametrize.is_parametrized(m):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.01)


class MDEQInjection(nn.Module):
    """Stem: x (B, in_channels, H, W) -> injection (B, C_0, H_0, W_0) for the top scale.

    Two 3x3 convolutions with BatchNorm and ReLU (stride 2 for each of the first
    `downsample_times`), further stride-2 convolutions if downsample_times > 2, then a 1x1
    convolution, BatchNorm and ReLU.
    """

    def __init__(self, config: MDEQConfig, in_channels: int = 3) -> None:
        super().__init__()
        c = config.channels[0]
        layers: list[nn.Module] = []
        for k in range(max(2, config.downsample_times)):
            stride = 2 if k < config.downsample_times else 1
            conv = _conv3x3(in_channels if k == 0 else c, c, stride)
            layers += [conv, nn.BatchNorm2d(c), nn.ReLU()]
        layers += [nn.Conv2d(c, c, kernel_size=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        _init_plain_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """MDEQ residual block on one scale: (B, C, H, W) -> (B, C, H, W).

    out = GN3(ReLU(GN2(drop(conv2(ReLU(GN1(conv1(z))))) + inj) + z)), conv1 widening C to
    expansion * C and conv2 narrowing back.
    """

    def __init__(
        self, channels: int, expansion: int, num_groups: int, dropout: float, wnorm: bool
    ) -> None:
        super().__init__()
        inner = expansion * channels
        self.conv1 = _maybe_weight_norm(_conv3x3(channels, inner), wnorm)
        self.gn1 = nn.GroupNorm(num_groups, inner)
        self.conv2 = _maybe_weight_norm(_conv3x3(inner, channels), wnorm)
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)
        self.drop = VariationalDropout(dropout)

    def forward(self, z: Tensor, inj: Tensor | None = None) -> Tensor:
        out = torch.relu(self.gn1(self.conv1(z)))
        out = self.drop(self.conv2(out))
        if inj is not None:
            out = out + inj
        out = self.gn2(out) + z
        return self.gn3(torch.relu(out))


def _downsample(channels: Sequence[int], src: int, dst: int, num_groups: int) -> nn.Sequential:
    """Scale src -> coarser scale dst: (dst - src) stride-2 3x3 convolutions with GroupNorm."""
    steps: list[nn.Module] = []
    for k in range(dst - src):
        last = k == dst - src - 1
        c_out = channels[dst] if last else channels[src]
        step: list[nn.Module] = [
            _conv3x3(channels[src], c_out, stride=2),
            nn.GroupNorm(num_groups, c_out),
        ]
        if not last:
            step.append(nn.ReLU())
        steps.append(nn.Sequential(*step))
    return nn.Sequential(*steps)


def _upsample(channels: Sequence[int], src: int, dst: int, num_groups: int) -> nn.Sequential:
    """Scale src -> finer scale dst: 1x1 convolution, GroupNorm, nearest upsampling."""
    return nn.Sequential(
        nn.Conv2d(channels[src], channels[dst], kernel_size=1, bias=False),
        nn.GroupNorm(num_groups, channels[dst]),
        nn.Upsample(scale_factor=2 ** (src - dst), mode="nearest"),
    )


class MDEQLayer(nn.Module):
    """MDEQ's f_theta on a packed state: (z (B, d), inj (B, C_0, H_0, W_0)) -> (B, d).

    Each scale runs its residual block (only scale 0 receives the injection); every scale
    then sums the resampled outputs of all scales, followed by ReLU, a 1x1 convolution
    and GroupNorm.
    """

    def __init__(self, config: MDEQConfig, layout: ScaleLayout) -> None:
        super().__init__()
        self.layout = layout
        ch = config.channels
        groups = config.num_groups
        self.blocks = nn.ModuleList(
            BasicBlock(c, config.expansion, groups, config.dropout, config.weight_norm) for c in ch
        )
        self.fuse = nn.ModuleList(
            nn.ModuleList(
                nn.Identity()
                if src == dst
                else (_downsample if src < dst else _upsample)(ch, src, dst, groups)
                for src in range(len(ch))
            )
            for dst in range(len(ch))
        )
        self.post_fuse = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                _maybe_weight_norm(nn.Conv2d(c, c, kernel_size=1, bias=False), config.weight_norm),
                nn.GroupNorm(groups // 2, c, affine=config.post_gn_affine),
            )
            for c in ch
        )
        _init_plain_convs(self)

    def init_state(self, inj: Tensor) -> Tensor:
        """The zero state (B, d) for the batch of `inj`."""
        return inj.new_zeros(inj.shape[0], self.layout.dim)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        zs = self.layout.unpack(z)
        ys = [
            block(z_i, inj if i == 0 else None)
            for i, (block, z_i) in enumerate(zip(self.blocks, zs, strict=True))
        ]
        fused = []
        for row, post in zip(self.fuse, self.post_fuse, strict=True):
            resamplers = cast(nn.ModuleList, row)
            fused.append(post(sum(r(y) for r, y in zip(resamplers, ys, strict=True))))
        return self.layout.pack(fused)


class Bottleneck(nn.Module):
    """Head bottleneck (B, C_in, H, W) -> (B, 4 * planes, H, W): 1x1, 3x3, 1x1 convolutions
    with non-affine BatchNorm and a projected (1x1 convolution + BatchNorm) shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, planes, kernel_size=1, bias=False),
            nn.BatchNorm2d(planes, affine=False),
            nn.ReLU(),
            _conv3x3(planes, planes),
            nn.BatchNorm2d(planes, affine=False),
            nn.ReLU(),
            nn.Conv2d(planes, c_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_out, affine=False),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class MDEQHead(nn.Module):
    """HRNet-style classifier: packed state (B, d) -> logits (B, num_classes).

    Each scale is widened by a bottleneck to 4 * head_channels[i]; the running sum is carried
    from the finest scale to the coarsest by stride-2 3x3 convolutions, then a 1x1 convolution
    to final_channels, global average pooling and a linear classifier.
    """

    def __init__(self, config: MDEQConfig, layout: ScaleLayout, num_classes: int) -> None:
        super().__init__()
        self.layout = layout
        wide = [h * Bottleneck.expansion for h in config.head_channels]
        self.incre = nn.ModuleList(
            Bottleneck(c, h) for c, h in zip(config.channels, config.head_channels, strict=True)
        )
        self.down = nn.ModuleList(
            nn.Sequential(_conv3x3(a, b, stride=2, bias=True), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in pairwise(wide)
        )
        self.final = nn.Sequential(
            nn.Conv2d(wide[-1], config.final_channels, kernel_size=1),
            nn.BatchNorm2d(config.final_channels),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(config.final_channels, num_classes)
        _init_plain_convs(self)

    def forward(self, z: Tensor) -> Tensor:
        zs = self.layout.unpack(z)
        y = self.incre[0](zs[0])
        for incre, down, z_i in zip(self.incre[1:], self.down, zs[1:], strict=True):
            y = incre(z_i) + down(y)
        y = self.final(y)
        return self.classifier(y.mean(dim=(2, 3)))


def mdeq_parts(
    config: MDEQConfig, num_classes: int = 10, in_channels: int = 3, image_size: int = 32
) -> tuple[MDEQInjection, MDEQLayer, MDEQHead]:
    """Build (injection, f, head) of an MDEQ classifier for square images of side image_size."""
    layout = mdeq_layout(config, image_size)
    return (
        MDEQInjection(config, in_channels),
        MDEQLayer(config, layout),
        MDEQHead(config, layout, num_classes),
    )


@register_model
def deq_large(num_classes: int = 10, *, post_gn_affine: bool = False, **deq_kwargs: Any) -> DEQ:
    """DEQ-Large of the paper (MDEQ_LARGE) as a `DEQ` for 32x32 RGB images (its ``input_shape``);
    ``post_gn_affine`` gives the post-fusion GroupNorm affine parameters (torchdeq's zoo MDEQ)."""
    from deq_attacks.deq.model import DEQ

    config = dataclasses.replace(MDEQ_LARGE, post_gn_affine=post_gn_affine)
    injection, f, head = mdeq_parts(config, num_classes)
    return DEQ(f=f, injection=injection, head=head, input_shape=(3, 32, 32), **deq_kwargs)


@register_model
def deq_xl(num_classes: int = 10, *, post_gn_affine: bool = False, **deq_kwargs: Any) -> DEQ:
    """DEQ-XL of the paper (MDEQ_XL) as a `DEQ` for 32x32 RGB images (its ``input_shape``);
    ``post_gn_affine`` gives the post-fusion GroupNorm affine parameters (torchdeq's zoo MDEQ)."""
    from deq_attacks.deq.model import DEQ

    config = dataclasses.replace(MDEQ_XL, post_gn_affine=post_gn_affine)
    injection, f, head = mdeq_parts(config, num_classes)
    return DEQ(f=f, injection=injection, head=head, input_shape=(3, 32, 32), **deq_kwargs)
