"""The autograd path: a torch module whose output is the defended logits and whose backward
routes the incoming cotangent through the selected gradient estimate (straight-through)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from deq_attacks.deq.contract import DEQModel
from deq_attacks.deq.convergence import last_residuals, warn_unconverged
from deq_attacks.deq.readout import Final, Readout, check_readout
from deq_attacks.gradients import Exact, GradientEstimate, estimate_names, input_gradient
from deq_attacks.gradients.base import Cotangent, constant_cotangent, loss_cotangent
from deq_attacks.numerics import ForwardRecord
from deq_attacks.solvers import Trajectory

LAYERS = ("fixed_point", "readout", "logits")
"""The layers of a ``WhiteBoxModule`` a user can name (ART's ``layer_names``): the last iterate
of the solve (flat, (B, d)), the state the defense classifies (flat, (B, d)) and the defended
logits (B, classes). Each is an ``nn.Identity`` child that a forward calls, so forward hooks on
it fire; in a differentiable forward its output carries the selected estimate's gradient."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(logits (B, classes), labels (B,)) -> scalar``."""


def check_estimate(estimate: object, deq: DEQModel) -> GradientEstimate:
    """Return ``estimate`` if it is a GradientEstimate computable over ``deq``'s solver."""
    if not isinstance(estimate, GradientEstimate):
        raise TypeError(
            f"unknown gradient estimate {estimate!r}: use a deq_attacks GradientEstimate (the "
            f"registered ones: {', '.join(estimate_names())})"
        )
    estimate.check(deq.solver)
    return estimate


def check_deq(deq: object) -> DEQModel:
    """Return ``deq`` if it is a torch module that fulfils the ``DEQModel`` contract."""
    if not isinstance(deq, DEQModel):
        raise TypeError(
            f"deq must be a deq_attacks.deq.DEQModel (e.g. a deq_attacks.DEQ, or one built by "
            f"deq_attacks.adapters; see docs/own_deq.md), got {type(deq).__name__}"
        )
    return deq


class StateHead(DEQModel):
    """``deq`` with an identity head: ``logits(z, injection)`` is the flat state z itself, so
    that a defended call over it returns the readout state (B, d) and its backward pulls a
    cotangent on that state back through the same gradient estimate. Everything else is
    ``deq``'s (its parameters are not registered here again)."""

    def __init__(self, deq: DEQModel) -> None:
        super().__init__()
        self.inner: DEQModel
        object.__setattr__(self, "inner", deq)  # not a submodule: no second parameter copy
        self.solver = deq.solver
        self.training_gradient = deq.training_gradient
        self.readout = deq.readout
        self.input_shape = deq.input_shape

    def inject(self, x: Tensor) -> Tensor:
        return self.inner.inject(x)

    def initial_state(self, injection: Tensor) -> Tensor:
        return self.inner.initial_state(injection)

    def step(self, z: Tensor, injection: Tensor) -> Tensor:
        return self.inner.step(z, injection)

    def logits(self, z: Tensor, injection: Tensor) -> Tensor:
        return z

    def reset(self) -> None:
        self.inner.reset()

    def solve(
        self,
        injection: Tensor,
        keep: bool | Collection[int] = False,
        steps: int | None = None,
        *,
        record: ForwardRecord | None = None,
    ) -> Trajectory:
        return self.inner.solve(injection, keep, steps, record=record)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode and restore every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass(frozen=True, eq=False)
class DefendedCall:
    """What one defended forward needs, fixed when it runs and read again by its backward.

    Attributes:
        deq: the model.
        estimate: the gradient estimate of this call.
        defense: the readout whose logits are returned.
        loss, labels: loss-aware backward (Eq. 11/13/17): the loss is evaluated at each
            surrogate state with these labels (B,); None: the incoming cotangent is used
            straight-through.
        on_backward: called once per backward (instrumentation), or None.
    """

    deq: DEQModel
    estimate: GradientEstimate
    defense: Readout
    loss: LossFn | None = None
    labels: Tensor | None = None
    on_backward: Callable[[], None] | None = None

    def cotangent(self, grad: Tensor) -> Cotangent:
        if self.loss is not None and self.labels is not None:
            return loss_cotangent(self.loss, self.labels)
        return constant_cotangent(grad)


class _Defended(torch.autograd.Function):
    """Forward: defended logits and the per-sample residuals of the solve. Backward: the
    estimate's dL/dx for the incoming cotangent (or the call's loss and labels)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, call: DefendedCall) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        deq = call.deq
        keep = set(call.defense.keep_steps())
        estimate_keep: bool | frozenset[int] = False
        # a solve that no estimate will read stops where the defense stops (Early(n): at n)
        steps: int | None = call.defense.horizon(deq.solver.threshold)
        if ctx.needs_input_grad[0]:
            estimate_keep = call.estimate.keep_steps(deq.solver.threshold)
            steps = None
        reuse = ctx.needs_input_grad[0] and call.estimate.reuses_forward
        record = ForwardRecord() if reuse else None
        with eval_mode(deq):
            injection = deq.inject(x)
            kept = True if estimate_keep is True else keep | set(estimate_keep or ())
            if record is None:
                trajectory = deq.solve(injection, keep=kept, steps=steps)
            else:
                trajectory = deq.solve(injection, keep=kept, steps=steps, record=record)
            logits = deq.logits(call.defense.state(deq, trajectory, injection), injection)
        residuals = last_residuals(trajectory)
        ctx.call = call
        ctx.trajectory = trajectory
        ctx.record = record
        ctx.save_for_backward(x)
        ctx.mark_non_differentiable(residuals)
        return logits, residuals

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        call: DefendedCall = ctx.call
        trajectory: Trajectory = ctx.trajectory
        with eval_mode(call.deq):
            grad_x = input_gradient(
                call.deq,
                call.estimate,
                x,
                call.cotangent(grad),
                trajectory,
                call.defense,
                evaluations=ctx.record,
            )
        ctx.record = None  # its graphs are spent
        if call.on_backward is not None:
            call.on_backward()
        return grad_x, None


class WhiteBoxModule(nn.Module):
    """A DEQ as a plain torch module for attacks that differentiate the model themselves
    (ART's APGD/AutoAttack, Foolbox, torchattacks, AutoAttack).

    ``forward(x)`` returns the logits of ``defense``, computed with the DEQ in eval mode, and
    its backward gives the ``estimate`` of dL/dx: whatever ``module.training`` says, since
    libraries flip it (torchattacks restores the train mode of the module it was handed). The
    estimate, defense and labels of a forward are fixed when it runs: a backward that runs
    later, after ``using(...)`` has closed or another forward, still uses its own. A solve that
    leaves samples above ``RESIDUAL_LIMIT`` warns once per call.

    Training goes through the DEQ itself (``deq(x)``: Final readout, training gradient), or,
    for ART's ``fit``, through ``fitting()``, which only ``DEQEstimator`` enters.

    Args:
        deq: the model (any ``DEQModel`` module, usually a ``deq_attacks.DEQ``).
        estimate: the gradient estimate attacks receive (default Exact()).
        defense: the readout that is classified (default the DEQ's own).
    """

    def __init__(
        self,
        deq: DEQModel,
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
    ) -> None:
        super().__init__()
        self.deq = check_deq(deq)
        self._estimate = check_estimate(estimate if estimate is not None else Exact(), deq)
        self._defense = self._checked_defense(defense if defense is not None else deq.readout)
        self._fitting = False
        self.backward_calls = 0
        self.fixed_point = nn.Identity()
        self.readout = nn.Identity()
        self.logits = nn.Identity()

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

    def view(
        self,
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
        *,
        deq: DEQModel | None = None,
    ) -> WhiteBoxModule:
        """A new module over the same DEQ object (no parameter is copied) with its own estimate
        and defense (None: this module's), checked here. This module is not changed: the
        package's own code switches estimates and defenses this way. The view is in eval mode;
        the shared DEQ's mode is left as it is (forwards run it in eval mode anyway). ``deq``:
        another DEQ that computes the same function over the same parameters to view instead
        (e.g. ``deq_attacks.acceleration.compiled_f``)."""
        module = WhiteBoxModule(
            self.deq if deq is None else deq,
            estimate if estimate is not None else self._estimate,
            defense if defense is not None else self._defense,
        )
        module.training = False  # this module only: train(False) would recurse into the DEQ
        return module

    @contextmanager
    def using(
        self, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> Iterator[WhiteBoxModule]:
        """Temporarily switch the estimate and/or the defense (for forwards run inside); a
        convenience for interactive use. Code that must not change a shared module uses
        ``view``."""
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
    def fitting(self) -> Iterator[None]:
        """While active, ``forward`` is the DEQ's own training forward (for ART's ``fit``)."""
        saved = self._fitting
        self._fitting = True
        try:
            yield
        finally:
            self._fitting = saved

    def _count_backward(self) -> None:
        self.backward_calls += 1

    def defended(
        self, x: Tensor, loss: LossFn | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Defended logits (B, classes) and the relative residual (B,) of each sample's last
        iterate (without a gradient, a solve for Early(n) stops at z_n: its residual), with the
        current estimate and defense; with ``loss`` and ``labels`` (B,), the
        backward evaluates the loss at each surrogate state (loss-aware) instead of using the
        incoming cotangent straight-through."""
        if (loss is None) != (labels is None):
            raise ValueError("give both loss and labels for a loss-aware backward, or neither")
        call = DefendedCall(
            self.deq, self._estimate, self._defense, loss, labels, self._count_backward
        )
        logits, residuals = _Defended.apply(x, call)
        return logits, residuals

    def input_gradient(
        self,
        x: Tensor,
        cotangent: Cotangent,
        estimate: GradientEstimate | None = None,
        trajectory: Trajectory | None = None,
    ) -> Tensor:
        """dL/dx by ``estimate`` (default: the current one) for a given cotangent source, for
        the current defense, with the DEQ in eval mode."""
        with eval_mode(self.deq):
            return input_gradient(
                self.deq, estimate or self._estimate, x, cotangent, trajectory, self._defense
            )

    def loss_gradient(self, x: Tensor, loss: LossFn, labels: Tensor) -> Tensor:
        """dL/dx (shaped like x) by the current estimate with ``loss(logits, labels)``
        evaluated at each of its surrogate states (Eq. 11, 13, 17), for the current defense;
        counted in ``backward_calls``. The same gradient as the backward of
        ``defended(x, loss, labels)``, without computing the defended logits."""
        grad = self.input_gradient(x, loss_cotangent(loss, labels))
        self._count_backward()
        return grad

    @property
    def reads_fixed_point(self) -> bool:
        """Whether the defense reads the end of the solve (Final, Ensemble), so that an
        unconverged solve is worth a warning; Early(n) stops short of it by design."""
        return self._defense.horizon(self.deq.solver.threshold) >= self.deq.solver.threshold

    def states(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The last iterate of the solve and the defense's readout state, both flat (B, d),
        each from its own defended solve; differentiable w.r.t. x by the current estimate
        (the cotangent on the state is pulled back straight-through, as for the logits)."""
        head = StateHead(self.deq)
        fixed, _ = _Defended.apply(x, DefendedCall(head, self._estimate, Final()))
        state, _ = _Defended.apply(x, DefendedCall(head, self._estimate, self._defense))
        return fixed, state

    def forward(self, x: Tensor) -> Tensor:
        """Defended logits (B, classes); inside ``fitting()``, the DEQ's training forward.
        Passes through the ``LAYERS`` children, so their forward hooks fire (the state layers
        cost two more solves, and only while a hook is registered on one of them)."""
        if self._fitting:
            return cast(Tensor, self.deq(x))
        logits, residuals = self.defended(x)
        if self.reads_fixed_point:
            warn_unconverged(residuals, stacklevel=4)  # the caller of module(x)
        if self.fixed_point._forward_hooks or self.readout._forward_hooks:
            fixed, state = self.states(x)
            self.fixed_point(fixed)
            self.readout(state)
        return cast(Tensor, self.logits(logits))

    def extra_repr(self) -> str:
        return f"estimate={self._estimate!r}, defense={self._defense!r}"
