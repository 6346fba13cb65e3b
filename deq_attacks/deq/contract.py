"""The model contract: what readouts, training gradients, estimates and front ends need of a DEQ.

Every state is flat, (B, d): the solver, the trajectory and the estimates never see the
model's own state shape. ``deq_attacks.DEQ`` is the implementation; the adapters
(``deq_attacks.adapters``) build one from a torchdeq model, an MDEQ checkpoint or any
``f(z, x)`` module, so a user rarely writes their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from torch import Tensor, nn

from deq_attacks.solvers import Solver, Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.backward import TrainingGradient
    from deq_attacks.deq.readout import Readout
    from deq_attacks.numerics import ForwardRecord

ResetHook = Callable[[nn.Module], None]
"""Called with ``f`` before each forward solve: recompute normalised weights, draw new dropout
masks (``deq_attacks.deq.dropout.reset_variational_dropout``, torchdeq's ``reset_norm`` and
``reset_dropout``)."""


class DEQModel(nn.Module, ABC):
    """A deep equilibrium classifier as the rest of the package sees it: an ``nn.Module``
    whose ``forward(x)`` is its training forward (Final readout, training gradient).

    Attributes:
        solver: the forward solver (its ``threshold`` bounds every step index n).
        training_gradient: how the solver's answer re-enters autograd (also the Final readout).
        readout: the default defense.
        input_shape: the sample shape (without batch) the model was built for, or None when
            it declares none; front ends check data against it before any work.
    """

    solver: Solver
    training_gradient: TrainingGradient
    readout: Readout
    input_shape: tuple[int, ...] | None = None

    @abstractmethod
    def inject(self, x: Tensor) -> Tensor:
        """Validate the input batch (B, ...) and return the injection (B, ...)."""

    @abstractmethod
    def initial_state(self, injection: Tensor) -> Tensor:
        """``z_0`` in the model's own state shape (B, *S)."""

    @abstractmethod
    def step(self, z: Tensor, injection: Tensor) -> Tensor:
        """One application of f on flat states: (B, d) -> (B, d)."""

    @abstractmethod
    def logits(self, z: Tensor, injection: Tensor) -> Tensor:
        """The head on a flat state (B, d) -> logits (B, classes)."""

    @abstractmethod
    def reset(self) -> None:
        """Run the reset hooks on f (called by ``solve`` before each forward solve)."""

    @abstractmethod
    def solve(
        self,
        injection: Tensor,
        keep: bool | Collection[int] = False,
        steps: int | None = None,
        *,
        record: ForwardRecord | None = None,
    ) -> Trajectory:
        """Reset, then solve ``z = f(z; injection)`` from ``z_0`` without autograd; ``steps``
        (below the solver's threshold) stops after that many iterates. With ``record``, the
        solver's map is ``record.wrap(self.step, injection)``: every evaluation of f is kept
        with its graph."""
