"""The ready-made attack of a training gradient: the estimate equal to the gradient the model
trains with. PGD-AT makes its adversaries with it (Appendix A), and it is the attack a user of
a DEQ library runs first (the paper's "ready-made" column).

``ready_made`` dispatches on the training gradient's type; a new training gradient registers
its attack estimate with ``@ready_made.register``::

    @ready_made.register
    def _(gradient: MyGradient) -> GradientEstimate:
        return MyEstimate(...)
"""

from __future__ import annotations

import functools

from deq_attacks.deq.backward import ImplicitGradient, PhantomGradient
from deq_attacks.gradients.base import GradientEstimate
from deq_attacks.gradients.exact import Exact
from deq_attacks.gradients.phantom import Phantom


@functools.singledispatch
def ready_made(gradient: object) -> GradientEstimate:
    """The attack-side estimate equal to the training gradient ``gradient``:
    ``ImplicitGradient(s)`` -> ``Exact(s)``, ``PhantomGradient(k, lam)`` -> ``Phantom(k, lam)``.
    An unregistered type raises TypeError."""
    raise TypeError(
        f"no ready-made attack estimate is registered for {type(gradient).__name__} "
        f"({gradient!r}); register one with @deq_attacks.gradients.ready_made.register"
    )


@ready_made.register
def _implicit(gradient: ImplicitGradient) -> GradientEstimate:
    return Exact(gradient.backward_solver)


@ready_made.register
def _phantom(gradient: PhantomGradient) -> GradientEstimate:
    return Phantom(gradient.k, gradient.lam)
