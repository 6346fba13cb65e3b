"""The model, optimizer and schedule a TrainConfig describes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deq_attacks.deq import (
    DEQ,
    ImplicitGradient,
    JacobianRegularization,
    PhantomGradient,
    TrainingGradient,
    VariationalDropout,
)
from deq_attacks.models import create_model
from deq_attacks.solvers import Broyden
from deq_attacks.training.config import Gradient, TrainConfig

#: Models built for 3x32x32 inputs only.
_CIFAR_ONLY = frozenset({"deq_large", "deq_xl"})


def training_gradient(config: TrainConfig) -> TrainingGradient:
    if config.gradient is Gradient.PHANTOM:
        return PhantomGradient(config.phantom_k, config.phantom_lam)
    return ImplicitGradient(Broyden(threshold=config.backward_threshold, tol=config.solver_tol))


def jacobian_regularization(config: TrainConfig) -> JacobianRegularization | None:
    if config.jac_weight == 0:
        return None
    return JacobianRegularization(weight=config.jac_weight, frequency=config.jac_frequency)


def build_model(
    config: TrainConfig, image_shape: tuple[int, int, int], num_classes: int
) -> nn.Module:
    """The model ``config.model`` for images ``image_shape`` (C, H, W) and ``num_classes``."""
    channels, side, _ = image_shape
    if config.model in _CIFAR_ONLY and image_shape != (3, 32, 32):
        raise ValueError(f"{config.model} takes 3x32x32 images; the data has {image_shape}")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if config.is_deq:
        kwargs.update(
            solver=Broyden(threshold=config.forward_threshold, tol=config.solver_tol),
            training_gradient=training_gradient(config),
            jacobian_regularization=jacobian_regularization(config),
        )
    if config.model == "small_conv_deq":
        kwargs.update(in_channels=channels, image_size=side)
        if config.width is not None:
            kwargs["channels"] = config.width
        if config.dropout is not None:
            kwargs["dropout"] = config.dropout
    elif config.model in ("resnet18", "wrn34_10"):
        kwargs["in_channels"] = channels
        if config.width is not None:
            kwargs["width" if config.model == "resnet18" else "widen"] = config.width
    model = create_model(config.model, **kwargs)
    if config.is_deq and not isinstance(model, DEQ):
        raise TypeError(
            f"{config.model} built a {type(model).__name__}, not a DEQ: use gradient=autograd"
        )
    if not config.is_deq and isinstance(model, DEQ):
        raise TypeError(f"{config.model} is a DEQ: use gradient=exact or phantom")
    return model


def unrolled_logits(deq: DEQ, x: Tensor, depth: int) -> Tensor:
    """The weight-tied network run unrolled (the reference code's pretraining): ``depth``
    applications of f from ``z_0``, autograd through all of them, then the head."""
    for module in deq.f.modules():
        if isinstance(module, VariationalDropout):
            module.reset_mask()
    injection = deq.inject(x)
    z = deq.initial_state(injection).reshape(x.shape[0], -1)
    for _ in range(depth):
        z = deq.step(z, injection)
    return deq.logits(z, injection)


class TrainingModule(nn.Module):
    """What DistributedDataParallel wraps: ``forward(x, unrolled)`` is the model's forward, or
    for a DEQ with ``unrolled=True`` its unrolled pretraining network, so both pass through
    DDP's forward (which gradient synchronisation needs)."""

    def __init__(self, model: nn.Module, depth: int) -> None:
        super().__init__()
        self.model = model
        self.depth = depth

    def forward(self, x: Tensor, unrolled: bool = False) -> Tensor:
        if unrolled and isinstance(self.model, DEQ):
            return unrolled_logits(self.model, x, self.depth)
        return self.model(x)


def optimizer_and_schedule(
    model: nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam with a cosine decay from ``lr`` to ``lr_min`` stepped once per optimizer step over
    the whole run (as the reference code's CosineAnnealingLR)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=total_steps, eta_min=config.lr_min
    )
    return optimizer, schedule
