"""A Foolbox model over a DEQ with the same switchable gradient estimate and defense."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import eagerpy as ep
import foolbox as fb
import torch

from deq_attacks.deq.contract import DEQModel
from deq_attacks.deq.readout import Readout
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces.inputs import check_bounds, check_query
from deq_attacks.interfaces.whitebox import WhiteBoxModule

T = TypeVar("T")


class DEQFoolboxModel(fb.PyTorchModel):
    """Usable wherever ``foolbox.PyTorchModel`` is: Foolbox's attacks differentiate the
    defended logits and receive the selected estimate (straight-through cotangent).

    Every call checks, before any work, that the input is a non-empty floating-point batch
    whose samples have ``input_shape``; its values are passed through as
    ``foolbox.PyTorchModel`` passes them (Foolbox's EAD and VirtualAdversarial query a hair
    outside ``bounds``, BoundaryAttack may query NaN candidates: their logits come back, NaN
    where the input was NaN). Data a user hands to the package's own entry points (``fit``,
    ``predict``, the protocol) is checked in full (range and finiteness too).

    Args:
        deq: the model.
        bounds: input range, default (0, 1).
        estimate, defense: as in ``WhiteBoxModule``.
        input_shape: the shape of one input, e.g. (3, 32, 32); None: the DEQ's own
            ``input_shape`` attribute where it declares one, else the sample shape is not
            checked (range, dtype and finiteness still are).
        device: passed to ``foolbox.PyTorchModel`` (None: CUDA if available).
        preprocessing: Foolbox's preprocessing (``dict(mean=..., std=..., axis=...)``).
    """

    def __init__(
        self,
        deq: DEQModel,
        bounds: tuple[float, float] = (0.0, 1.0),
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
        *,
        input_shape: tuple[int, ...] | None = None,
        device: Any = None,
        preprocessing: Any = None,
    ) -> None:
        check_bounds(bounds)
        module = WhiteBoxModule(deq, estimate, defense)
        module.training = False  # the module only; forwards run the DEQ in eval mode anyway
        super().__init__(module, bounds=bounds, device=device, preprocessing=preprocessing)
        self.white_box = module
        declared = input_shape if input_shape is not None else getattr(deq, "input_shape", None)
        self.input_shape = None if declared is None else tuple(declared)
        self._preprocessing = preprocessing

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

    def __call__(self, inputs: T) -> T:
        """The defended logits of ``inputs`` (a native or eagerpy tensor), after checking their
        shape and dtype (not their values: see the class docstring). Samples holding NaN or
        inf get NaN logits (a plain module's answer) without entering the solve, so they
        cannot disturb the others."""
        x, restore = ep.astensor_(inputs)  # type: ignore[type-var]
        check_query(x.raw, self.input_shape)
        raw = x.raw
        finite = torch.isfinite(raw.flatten(1)).all(dim=1)
        if bool(finite.all()):
            return super().__call__(inputs)  # type: ignore[no-any-return]
        probe = raw[finite] if bool(finite.any()) else torch.zeros_like(raw[:1])
        out = super().__call__(probe)
        logits = out.new_full((raw.shape[0], out.shape[1]), float("nan"))
        if bool(finite.any()):
            logits[finite] = out
        return restore(ep.astensor(logits))  # type: ignore[no-any-return]

    def view(
        self, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> DEQFoolboxModel:
        """A new Foolbox model over the same DEQ object with its own estimate and defense (None:
        this one's), and this one's bounds, input shape, device and preprocessing."""
        module = self.white_box.view(estimate, defense)
        return DEQFoolboxModel(
            self.white_box.deq,
            (float(self.bounds[0]), float(self.bounds[1])),
            module.estimate,
            module.defense,
            input_shape=self.input_shape,
            device=self.device,
            preprocessing=self._preprocessing,
        )

    @contextmanager
    def using(
        self, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> Iterator[DEQFoolboxModel]:
        """Temporarily switch the estimate and/or the defense (a convenience; code that must
        not change a shared model uses ``view``)."""
        with self.white_box.using(estimate, defense):
            yield self
