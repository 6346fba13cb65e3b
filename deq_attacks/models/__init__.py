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
from deq_attacks.models.registry import create_model, list_models, register_model
from deq_attacks.models.resnet import ResNet, resnet18
from deq_attacks.models.wrn import WideResNet, wrn34_10

__all__ = [
    "MDEQ_LARGE",
    "MDEQ_XL",
    "MDEQConfig",
    "ResNet",
    "WideResNet",
    "conv_deq_parts",
    "create_model",
    "deq_large",
    "deq_xl",
    "list_models",
    "mdeq_parts",
    "mlp_deq",
    "mlp_deq_parts",
    "register_model",
    "resnet18",
    "small_conv_deq",
    "wrn34_10",
]
