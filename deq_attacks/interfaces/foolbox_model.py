"""A Foolbox model over a DEQ with the same switchable gradient estimate and defense."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import foolbox as fb

from deq_attacks.deq.contract import DEQModel
from deq_attacks.deq.readout import Readout
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces.whitebox import WhiteBoxModule


class DEQFoolboxModel(fb.PyTorchModel):
    """Usable wherever ``foolbox.PyTorchModel`` is: Foolbox's attacks differentiate the
    defended logits and receive the selected estimate (straight-through cotangent).

    Args:
        deq: the model (put in eval mode here).
        bounds: input range, default (0, 1).
        estimate, defense: as in ``WhiteBoxModule``.
        **kwargs: passed to ``foolbox.PyTorchModel`` (device, preprocessing).
    """

    def __init__(
        self,
        deq: DEQModel,
        bounds: tuple[float, float] = (0.0, 1.0),
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
        **kwargs: Any,
    ) -> None:
        module = WhiteBoxModule(deq, estimate, defense).eval()
        super().__init__(module, bounds=bounds, **kwargs)
        self.white_box = module

    @property
    def gradient_estimate(self) -> GradientEstimate:
        return self.white_box.estimate

    @gradient_estimate.setter
    def gradient_estimate(self, value: GradientEstimate) -> None:
        self.white_box.estimate = value

    @property
    def defense(self) -> Readout:
        return self.white_box.defense

    @defense.setter
    def defense(self, value: Readout) -> None:
        self.white_box.defense = value

    @contextmanager
    def using(
        self, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> Iterator[DEQFoolboxModel]:
        """Temporarily switch the estimate and/or the defense."""
        with self.white_box.using(estimate, defense):
            yield self
