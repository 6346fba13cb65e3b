"""The model (through the one builder, ``deq_attacks.model_spec``), optimizer and schedules a
TrainConfig describes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deq_attacks import model_spec
from deq_attacks.deq import DEQ, DEQModel, JacobianRegularization
from deq_attacks.training.config import TrainConfig


@dataclass(frozen=True)
class JacobianSchedule:
    """Which optimizer steps carry the Jacobian penalty (Table 7: 2% of the DEQ-mode steps,
    until epoch 90).

    The DEQ-mode steps are those from global step ``start_step`` on (the end of the unrolled
    pretraining); DEQ-mode step i = global_step - start_step carries the penalty when
    floor((i + 1) f) > floor(i f) (a deterministic fraction ``frequency`` = f of them) and its
    0-based epoch is below ``stop_epoch``. The counter is the global step, which the run state
    saves: a resumed run applies the penalty on exactly the steps of an uninterrupted one.
    """

    regularization: JacobianRegularization
    frequency: float
    start_step: int
    stop_epoch: int

    def __post_init__(self) -> None:
        if not 0 < self.frequency <= 1:
            raise ValueError(f"frequency must be in (0, 1], got {self.frequency!r}")
        if self.start_step < 0 or self.stop_epoch < 0:
            raise ValueError("start_step and stop_epoch must be >= 0")

    def applies(self, global_step: int, epoch: int) -> bool:
        """Whether the step with this 0-based global index, in this 0-based epoch, carries it."""
        if global_step < self.start_step or epoch >= self.stop_epoch:
            return False
        i, f = global_step - self.start_step, self.frequency
        return math.floor((i + 1) * f) > math.floor(i * f)


def jacobian_schedule(config: TrainConfig) -> JacobianSchedule | None:
    """The penalty schedule of ``config`` (None: no regulariser, e.g. ``jac_weight=0``)."""
    if not config.is_deq or config.optimiser.jac_weight == 0:
        return None
    return JacobianSchedule(
        JacobianRegularization(weight=config.optimiser.jac_weight),
        config.optimiser.jac_frequency,
        config.optimiser.pretrain_steps,
        config.optimiser.jac_stop_epoch,
    )


def training_model(
    config: TrainConfig, image_shape: tuple[int, int, int], num_classes: int
) -> nn.Module:
    """The model ``config.model`` (``deq_attacks.model_spec.build_model``) for images
    ``image_shape`` (C, H, W) and ``num_classes``; a DEQ unless it trains with autograd."""
    model = model_spec.build_model(config.model, image_shape, num_classes).model
    if config.is_deq and not isinstance(model, DEQ):
        raise TypeError(
            f"{config.model.name} built a {type(model).__name__}, not a deq_attacks DEQ (the "
            "training loop runs its unrolled pretraining): use training_gradient autograd"
        )
    return model


def unrolled_logits(deq: DEQModel, x: Tensor, depth: int) -> Tensor:
    """The weight-tied network run unrolled (the reference code's pretraining): the model's
    reset hooks (dropout masks, weight normalisation), then ``depth`` applications of f from
    ``z_0``, autograd through all of them, then the head."""
    deq.reset()
    injection = deq.inject(x)
    z = deq.initial_state(injection).reshape(x.shape[0], -1)
    for _ in range(depth):
        z = deq.step(z, injection)
    return deq.logits(z, injection)


class TrainingModule(nn.Module):
    """What DistributedDataParallel wraps, so that every training forward passes through DDP's
    forward (which gradient synchronisation needs). ``forward(x, unrolled, penalty)`` returns
    (logits, Jacobian penalty or None): the model's forward; for a DEQ with ``unrolled=True``
    its unrolled pretraining network; with ``penalty``, the DEQ's forward with that penalty at
    its z*; ``solve_steps`` stops a DEQ's forward solve at z_n (random-intermediate-state
    training)."""

    def __init__(self, model: nn.Module, depth: int) -> None:
        super().__init__()
        self.model = model
        self.depth = depth

    def forward(
        self,
        x: Tensor,
        unrolled: bool = False,
        penalty: JacobianRegularization | None = None,
        solve_steps: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.model, DEQ):
            if unrolled:
                return unrolled_logits(self.model, x, self.depth), None
            if penalty is not None:
                return self.model.forward_with_penalty(x, penalty, solve_steps=solve_steps)
            return self.model(x, solve_steps=solve_steps), None
        if unrolled or penalty is not None or solve_steps is not None:
            raise ValueError(
                "unrolled pretraining, the Jacobian penalty and solve_steps are for DEQs only"
            )
        return self.model(x), None


def optimizer_and_schedule(
    model: nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam with a cosine decay from ``lr`` to ``lr_min`` stepped once per optimizer step over
    the whole run (as the reference code's CosineAnnealingLR)."""
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.optimiser.lr, weight_decay=config.optimiser.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=total_steps, eta_min=config.optimiser.lr_min
    )
    return optimizer, schedule
