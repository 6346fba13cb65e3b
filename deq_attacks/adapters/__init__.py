"""Bring your own DEQ: a torchdeq model, an official MDEQ checkpoint, or any ``f(z, x)``.

Each path yields a ``deq_attacks.DEQ`` (see docs/own_deq.md). The torchdeq adapter is in
``deq_attacks.adapters.torchdeq`` (it needs the optional ``torchdeq`` extra).
"""

from deq_attacks.adapters.mdeq import (
    MDEQ_CIFAR_MEAN,
    MDEQ_CIFAR_STD,
    MDEQ_ORIGINS,
    MDEQOrigin,
    convert_mdeq_state_dict,
    convert_torchdeq_mdeq_state_dict,
    load_mdeq_checkpoint,
    mdeq_key,
    mdeq_origin,
)
from deq_attacks.adapters.plain import WithStateShape, from_f, with_state_shape

__all__ = [
    "MDEQ_CIFAR_MEAN",
    "MDEQ_CIFAR_STD",
    "MDEQ_ORIGINS",
    "MDEQOrigin",
    "WithStateShape",
    "convert_mdeq_state_dict",
    "convert_torchdeq_mdeq_state_dict",
    "from_f",
    "load_mdeq_checkpoint",
    "mdeq_key",
    "mdeq_origin",
    "with_state_shape",
]
