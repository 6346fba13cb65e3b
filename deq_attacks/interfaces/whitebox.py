"""The autograd path: a torch module whose output is the defended logits and whose backward
routes the incoming cotangent through the selected gradient estimate (straight-through)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from deq_attacks.deq.model import DEQ
from deq_attacks.deq.readout import Readout, check_readout
from deq_attacks.gradients import Exact, GradientEstimate, input_gradient
from deq_attacks.gradients.base import Cotangent, constant_cotangent, loss_cotangent
from deq_attacks.solvers import Trajectory


def check_estimate(estimate: object, deq: DEQ) -> GradientEstimate:
    """Return ``estimate`` if it is a GradientEstimate computable over ``deq``'s solver."""
    if not isinstance(estimate, GradientEstimate):
        raise TypeError(
            f"unknown gradient estimate {estimate!r}: use one of deq_attacks.Exact, Phantom, "
            "Unrolled, Adjoint, AdjointBroyden or GradientEnsemble"
        )
    estimate.check(deq.solver)
    return estimate


class _Surrogate(torch.autograd.Function):
    """Forward: defended logits. Backward: the estimate's dL/dx for the incoming cotangent."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: WhiteBoxModule) -> Tensor:  # type: ignore[override]
        deq = module.deq
        keep = set(module.defense.keep_steps())
        estimate_keep: bool | frozenset[int] = False
        if ctx.needs_input_grad[0]:
            estimate_keep = module.estimate.keep_steps(deq.solver.threshold)
        injection = deq.inject(x)
        trajectory = deq.solve(
            injection, keep=True if estimate_keep is True else keep | set(estimate_keep or ())
        )
        logits = deq.logits(module.defense.state(deq, trajectory, injection), injection)
        ctx.module = module
        ctx.estimate = module.estimate
        ctx.defense = module.defense
        ctx.trajectory = trajectory
        ctx.save_for_backward(x)
        return logits

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        module: WhiteBoxModule = ctx.module
        cotangent = module.cotangent_override or constant_cotangent(grad)
        trajectory: Trajectory = ctx.trajectory
        grad_x = input_gradient(module.deq, ctx.estimate, x, cotangent, trajectory, ctx.defense)
        module.backward_calls += 1
        return grad_x, None


class WhiteBoxModule(nn.Module):
    """A DEQ as a plain torch module for attacks that differentiate the model themselves
    (ART's APGD/AutoAttack, Foolbox, torchattacks, AutoAttack).

    In eval mode, ``forward(x)`` returns the logits of ``defense`` and its backward gives
    the ``estimate`` of dL/dx. In train mode it is the DEQ's own training forward (Final
    readout, training gradient), so optimisers and ART's ``fit`` train it as usual.

    Args:
        deq: the model.
        estimate: the gradient estimate attacks receive (default Exact()).
        defense: the readout that is classified (default Final()).
    """

    def __init__(
        self, deq: DEQ, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> None:
        super().__init__()
        if not isinstance(deq, DEQ):
            raise TypeError(f"deq must be a deq_attacks DEQ, got {type(deq).__name__}")
        self.deq = deq
        self._estimate = check_estimate(estimate if estimate is not None else Exact(), deq)
        self._defense = self._checked_defense(defense if defense is not None else deq.readout)
        self.cotangent_override: Cotangent | None = None
        self.backward_calls = 0

    def _checked_defense(self, defense: object) -> Readout:
        readout = check_readout(defense)
        readout.check(self.deq.solver.threshold)
        return readout

    @property
    def estimate(self) -> GradientEstimate:
        """The gradient estimate attacks receive; settable on a live module."""
        return self._estimate

    @estimate.setter
    def estimate(self, value: GradientEstimate) -> None:
        self._estimate = check_estimate(value, self.deq)

    @property
    def defense(self) -> Readout:
        """The readout whose logits are returned; settable on a live module."""
        return self._defense

    @defense.setter
    def defense(self, value: Readout) -> None:
        self._defense = self._checked_defense(value)

    @contextmanager
    def using(
        self, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> Iterator[WhiteBoxModule]:
        """Temporarily switch the estimate and/or the defense."""
        saved = (self._estimate, self._defense)
        try:
            if estimate is not None:
                self.estimate = estimate
            if defense is not None:
                self.defense = defense
            yield self
        finally:
            self._estimate, self._defense = saved

    @contextmanager
    def loss_aware(
        self, loss: Callable[[Tensor, Tensor], Tensor], labels: Tensor
    ) -> Iterator[None]:
        """While active, backward evaluates ``loss(logits, labels)`` at each surrogate state
        (Eq. 11/13/17) instead of using the incoming cotangent straight-through."""
        self.cotangent_override = loss_cotangent(loss, labels)
        try:
            yield
        finally:
            self.cotangent_override = None

    def input_gradient(
        self,
        x: Tensor,
        cotangent: Cotangent,
        estimate: GradientEstimate | None = None,
        trajectory: Trajectory | None = None,
    ) -> Tensor:
        """dL/dx by ``estimate`` (default: the current one) for a given cotangent source, for
        the current defense."""
        return input_gradient(
            self.deq, estimate or self._estimate, x, cotangent, trajectory, self._defense
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.deq(x)
        return _Surrogate.apply(x, self)

    def extra_repr(self) -> str:
        return f"estimate={self._estimate!r}, defense={self._defense!r}"
