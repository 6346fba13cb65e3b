"""Numerics shared by the DEQ's training gradients (``deq_attacks.deq``) and the attack
estimates (``deq_attacks.gradients``): damped unrolling, the adjoint solve of the implicit
gradient, head gradients and the checks of step indices.

A leaf module: it imports torch and ``deq_attacks.solvers`` only, so ``deq`` and ``gradients``
both build on it without importing each other. Every state is flat, (B, d).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from deq_attacks.solvers import Solver, Trajectory

StepFn = Callable[[Tensor], Tensor]
"""``z -> f(z)`` on flat states (B, d), the injection closed over."""

InjectedStep = Callable[[Tensor, Tensor], Tensor]
"""``(z, injection) -> f(z; injection)`` on flat states (B, d) (``DEQModel.step``)."""

Cotangent = Callable[[Tensor], Tensor]
"""Maps logits (B, classes) computed at a surrogate state to dL/dlogits (B, classes)."""

LogitsFn = Callable[[Tensor], Tensor]
"""The head on flat states: (M, d) -> logits (M, classes), for any number M of states."""


def damped_unroll(step: StepFn, z_start: Tensor, k: int, lam: float) -> Tensor:
    """``z_t = (1 - lam) z_{t-1} + lam step(z_{t-1})`` for t = 1..k from ``z_start`` (Eq. 6/16)."""
    z = z_start
    for _ in range(k):
        z = (1 - lam) * z + lam * step(z)
    return z


def check_unroll(k: int, lam: float) -> None:
    """Validate unrolling steps ``k >= 1`` and damping ``lam`` in (0, 1]."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (unrolling steps) must be an int >= 1, got {k!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
        raise ValueError(f"lambda (damping) must be in (0, 1], got {lam!r}")


def check_step(n: int | None, name: str) -> None:
    """Validate an intermediate step index ``n >= 1`` (or None for the last iterate)."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}(n) needs an int n >= 1 (or None for the last), got {n!r}")


def check_within(n: int | None, solver: Solver, name: str) -> None:
    """Raise if step ``n`` is beyond the iterates ``solver`` can produce."""
    if n is not None and n > solver.threshold:
        raise ValueError(
            f"{name}(n={n}) is beyond the solver's threshold of {solver.threshold} iterates"
        )


def solve_adjoint(solver: Solver, fz: Tensor, z_leaf: Tensor, forcing: Tensor) -> Trajectory:
    """The solve of ``u = J_f(z)^T u + forcing`` (B, d) from ``u_0 = 0``, where ``fz = f(z_leaf)``
    carries the graph to ``z_leaf``; ``u*`` is its ``final``. A diverged sample is reported."""

    def adjoint_map(u: Tensor) -> Tensor:
        (vjp,) = torch.autograd.grad(fz, z_leaf, u, retain_graph=True)
        return vjp + forcing

    trajectory = solver.solve(adjoint_map, torch.zeros_like(forcing))
    if trajectory.diverged.any():
        count = int(trajectory.diverged.sum())
        warnings.warn(f"adjoint (backward) solve diverged for {count} sample(s)", stacklevel=3)
    return trajectory


def implicit_state(
    solver: Solver,
    step: InjectedStep,
    z_star: Tensor,
    injection: Tensor,
    on_backward: Callable[[Trajectory], object] | None = None,
) -> Tensor:
    """``f(z*; injection)`` (B, d) whose backward is the implicit gradient (Eq. 2-3).

    The incoming cotangent ``c`` of the returned state is replaced by ``u*`` solving
    ``u = J_f(z*)^T u + c`` with ``solver`` (``on_backward`` gets that solve's Trajectory), and
    autograd continues from there into ``f``'s parameters and ``injection``. ``z*`` is
    detached. Without a graph (no grad mode, nothing requiring grad) it is just ``f(z*)``.
    This is the one implementation of the adjoint solve and its VJP: the training gradient
    ``ImplicitGradient`` and the attack estimate ``Exact`` both use it.
    """
    z_star = z_star.detach()
    z_out = step(z_star, injection)
    if not z_out.requires_grad:
        return z_out
    z_leaf = z_star.clone().requires_grad_()
    f_leaf = step(z_leaf, injection.detach())

    def implicit(cotangent: Tensor) -> Tensor:
        trajectory = solve_adjoint(solver, f_leaf, z_leaf, cotangent)
        if on_backward is not None:
            on_backward(trajectory)
        return trajectory.final

    z_out.register_hook(implicit)
    return z_out


STACK_BUDGET = {"cpu": 2**18}
"""Most state elements one stacked head call takes, per device type (others: no limit). On a
CPU a stack larger than the caches is slower than separate calls (measured on the
benchmark's small conv DEQ, batch 64 x 4096: 8 states in one call took 1.8x the time of 8
calls, 2 per call 1.03x); on a GPU one call saves the launches of the others."""


def stack_size(state: Tensor, count: int) -> int:
    """How many of ``count`` states shaped like ``state`` (B, d) one stacked head call takes
    on their device (``STACK_BUDGET``), at least one."""
    budget = STACK_BUDGET.get(state.device.type)
    return count if budget is None else max(1, min(count, budget // max(1, state.numel())))


def head_gradient(logits: LogitsFn, z: Tensor, cotangent: Cotangent) -> Tensor:
    """dL(head(z))/dz (B, d) with dL/dlogits from ``cotangent``."""
    return head_gradients(logits, [z], cotangent)[0]


def head_gradients(
    logits: LogitsFn, states: Sequence[Tensor], cotangent: Cotangent, per_call: int | None = None
) -> list[Tensor]:
    """dL(head(z_m))/dz (B, d) for every state z_m (B, d) of ``states``: the states are stacked
    (M*B, d) for ONE head forward and ONE vector-Jacobian product, ``per_call`` states at a time
    (None: as many as ``STACK_BUDGET`` allows on their device, at least one); the cotangent is
    called per chunk of B logits (a loss-aware cotangent pairs them with its B labels)."""
    if not states:
        return []
    batch = states[0].shape[0]
    per_call = per_call if per_call is not None else stack_size(states[0], len(states))
    grads: list[Tensor] = []
    for start in range(0, len(states), per_call):
        with torch.enable_grad():
            group = states[start : start + per_call]
            stacked = torch.cat([z.detach() for z in group]).requires_grad_()
            out = logits(stacked)
            cotangents = torch.cat([cotangent(chunk) for chunk in out.split(batch)])
            (grad,) = torch.autograd.grad(out, stacked, cotangents)
        grads.extend(grad.split(batch))
    return grads


class ForwardRecord:
    """The evaluations of f in one forward solve, each with its autograd graph, so that a
    backward sweep can take vector-Jacobian products without evaluating f again.

    Evaluation m is f at the solver's candidate of step m (evaluation 0: f(z_0)); its input is
    kept as a leaf and the injection as one shared leaf. The candidate equals the iterate z_m
    only for samples that took step m: ``graph(m, z_m)`` returns the graph only where its
    input equals ``z_m`` for every sample, so a Jacobian taken from it is always f's at z_m.
    Memory: the activations of every evaluation (O(N)).
    """

    def __init__(self) -> None:
        self.injection: Tensor | None = None
        self._inputs: list[Tensor] = []
        self._outputs: list[Tensor | None] = []

    def __len__(self) -> int:
        return len(self._inputs)

    def wrap(self, step: InjectedStep, injection: Tensor) -> StepFn:
        """The map ``z -> f(z; injection)`` for one solve: it evaluates ``step`` with autograd
        (even inside the solver's no-grad mode) on a detached leaf copy of ``injection``
        (``self.injection``), records the evaluation and returns it detached."""
        if self.injection is not None:
            raise RuntimeError("a ForwardRecord records one forward solve; make a new one")
        leaf_injection = injection.detach().requires_grad_()
        self.injection = leaf_injection

        def evaluate(z: Tensor) -> Tensor:
            with torch.enable_grad():
                leaf = z.detach().clone().requires_grad_()
                out = step(leaf, leaf_injection)
            self._inputs.append(leaf)
            self._outputs.append(out)
            return out.detach()

        return evaluate

    def graph(self, m: int, z_m: Tensor) -> tuple[Tensor, Tensor] | None:
        """(input leaf, f output) of evaluation ``m`` if its input is ``z_m`` (B, d) for every
        sample and it was not taken before; else None (the caller evaluates f itself). A graph
        is handed out once: its buffers are freed by the one backward through it."""
        if m >= len(self._inputs):
            return None
        leaf, out = self._inputs[m], self._outputs[m]
        if out is None or leaf.shape != z_m.shape or not torch.equal(leaf, z_m.detach()):
            return None
        self._outputs[m] = None
        return leaf, out
