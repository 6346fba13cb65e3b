"""Tiny training configurations for the training tests (seconds on one CPU thread)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from deq_attacks.models import mlp_deq
from deq_attacks.training import TrainConfig, preset
from deq_attacks.training.config import Device

#: The paper presets (Table 7, 10 and the Table 4 baselines).
PAPER_PRESETS = [
    *(
        f"{m}_exact_{f}_{b}"
        for m in ("deq_large", "deq_xl")
        for f, b in ((8, 7), (18, 20), (30, 30), (50, 50))
    ),
    "deq_large_unrolling",
    "deq_xl_unrolling",
    "resnet18_pgd_at",
    "wrn34_10_pgd_at",
]


def tiny(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``config``'s code path on a tiny model and a few digits: 16 training images, batch 8,
    one pretraining step then PGD-2, one epoch, one CPU thread, no plot. ``changes`` name
    fields of any section (``TrainConfig.updated``)."""
    name, width = {"resnet18": ("resnet18", 4), "wrn34_10": ("wrn34_10", 1)}.get(
        config.model.name, ("small_conv_deq", 4)
    )
    key = {"resnet18": "width", "wrn34_10": "widen"}.get(name, "channels")
    values: dict[str, Any] = dict(
        model=dataclasses.replace(config.model, name=name, args={key: width}),
        source="digits",
        train_limit=16,
        dev_size=8,
        batch_size=8,
        epochs=1,
        pretrain_steps=1,
        steps=2,
        eps=0.1,
        step=0.05,
        eval_batch_size=8,
        spectral_samples=4,
        device=Device.CPU,
        threads=1,
        num_workers=0,
        plots=False,
    )
    if config.is_deq:
        values["jac_frequency"] = 0.5
    values.update(changes)
    return config.updated(**values)


def entry_point(config: TrainConfig, name: str) -> TrainConfig:
    """``config`` with the model built by the entry point ``name`` (no builder arguments)."""
    return config.updated(model=dataclasses.replace(config.model, name=name, args={}))


def tiny_preset(name: str, **changes: Any) -> TrainConfig:
    return tiny(preset(name), **changes)


def mlp_for_64_pixels(num_classes: int = 10, **deq_kwargs: Any) -> nn.Module:
    """Entry point ``tests.training_fixtures:mlp_for_64_pixels``: an MLP DEQ for images of 64
    pixels (the 1x8x8 digits) only."""
    return mlp_deq(64, num_classes, hidden=8, **deq_kwargs)


def three_class_deq(num_classes: int = 10, **deq_kwargs: Any) -> nn.Module:
    """Entry point that ignores ``num_classes``: 3 logits whatever the task."""
    return mlp_deq(64, 3, hidden=8, **deq_kwargs)
