"""Model zoo: (injection, f, head) parts and `DEQ` builders."""

from deq_attacks.models.conv import conv_deq_parts, small_conv_deq
from deq_attacks.models.mdeq import (
    MDEQ_LARGE,
    MDEQ_XL,
    MDEQConfig,
    deq_large,
    deq_xl,
    mdeq_parts,
)
from deq_attacks.models.mlp import mlp_deq, mlp_deq_parts

__all__ = [
    "MDEQ_LARGE",
    "MDEQ_XL",
    "MDEQConfig",
    "conv_deq_parts",
    "deq_large",
    "deq_xl",
    "mdeq_parts",
    "mlp_deq",
    "mlp_deq_parts",
    "small_conv_deq",
]
