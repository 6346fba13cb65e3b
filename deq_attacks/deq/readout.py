"""Readouts ("defenses", Sec. 5.2): which state of the forward pass the head classifies."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from deq_attacks.solvers import Trajectory

if TYPE_CHECKING:
    from deq_attacks.deq.contract import DEQModel


class Readout(ABC):
    """Chooses the flat state (B, d) that the head turns into the defended logits."""

    def keep_steps(self) -> frozenset[int]:
        """Iterates the solve must keep for this readout (O(1) memory: at most one)."""
        return frozenset()

    def check(self, threshold: int) -> None:
        """Raise if the readout cannot exist for a solver with this threshold."""
        return None

    def horizon(self, threshold: int) -> int:
        """The last iterate this readout needs: a solve for it alone may stop there."""
        return threshold

    @abstractmethod
    def state(self, deq: DEQModel, trajectory: Trajectory, injection: Tensor) -> Tensor:
        """The readout state (B, d) of a finished solve."""

    def traced_state(self, deq: DEQModel, trajectory: Trajectory, injection: Tensor) -> Tensor:
        """The readout state (B, d) of a differentiable solve, as ``state`` computes it but
        differentiable by plain autograd through the solve (no gradient substituted)."""
        return self.state(deq, trajectory, injection)


@dataclass(frozen=True)
class Final(Readout):
    """The state the model's training gradient produces from the solver's answer ``z*``:
    ``f(z*)`` for the implicit gradient, the damped unrolling of ``z*`` for the phantom one."""

    def state(self, deq: DEQModel, trajectory: Trajectory, injection: Tensor) -> Tensor:
        return deq.training_gradient.attach(deq, trajectory.final, injection)

    def traced_state(self, deq: DEQModel, trajectory: Trajectory, injection: Tensor) -> Tensor:
        return deq.training_gradient.forward_state(deq, trajectory.final, injection)


@dataclass(frozen=True)
class Early(Readout):
    """Early exit: the raw iterate ``z_n`` (a sample that stopped before n gives its last one)."""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"Early(n) needs an int n >= 1, got {self.n!r}")

    def keep_steps(self) -> frozenset[int]:
        return frozenset({self.n})

    def horizon(self, threshold: int) -> int:
        return min(self.n, threshold)

    def check(self, threshold: int) -> None:
        if self.n > threshold:
            raise ValueError(
                f"Early(n={self.n}) is beyond the solver's threshold of {threshold} iterates"
            )

    def state(self, deq: DEQModel, trajectory: Trajectory, injection: Tensor) -> Tensor:
        return trajectory.state(self.n)


@dataclass(frozen=True)
class Ensemble(Readout):
    """The running mean of each sample's iterates ``z_1..z_{N_i}``, kept in one accumulator."""

    def state(self, deq: DEQModel, trajectory: Trajectory, injection: Tensor) -> Tensor:
        return trajectory.mean_state()


def check_readout(readout: object) -> Readout:
    """Return ``readout`` if it is a Readout; else raise naming the defenses that exist."""
    if not isinstance(readout, Readout):
        raise TypeError(
            f"unknown defense {readout!r}: use deq_attacks.Final(), Early(n) or Ensemble()"
        )
    return readout
