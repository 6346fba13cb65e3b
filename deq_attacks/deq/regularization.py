"""Jacobian diagnostics and regularisation of f at a state: ||J_f||_F^2 and spectral radius."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

StepFn = Callable[[Tensor], Tensor]


def hutchinson_frobenius(
    step: StepFn, z: Tensor, samples: int = 1, create_graph: bool = True
) -> Tensor:
    """Unbiased Hutchinson estimate of ``||J_f(z)||_F^2`` per sample, shape (B,).

    ``E ||eps^T J||^2 = ||J||_F^2`` for ``eps ~ N(0, I)``; ``samples`` probes are averaged.
    With ``create_graph`` the estimate is differentiable in the parameters (for training).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    z_leaf = z.detach().requires_grad_()
    fz = step(z_leaf)
    total = z.new_zeros(z.shape[0])
    for i in range(samples):
        probe = torch.randn_like(fz)
        (vjp,) = torch.autograd.grad(
            fz,
            z_leaf,
            probe,
            create_graph=create_graph,
            retain_graph=i + 1 < samples or create_graph,
        )
        total = total + vjp.pow(2).sum(dim=-1)
    return total / samples


def spectral_radius(step: StepFn, z: Tensor, iterations: int = 30) -> Tensor:
    """Power-iteration estimate of the spectral radius of ``J_f(z)`` per sample, shape (B,).

    Iterates ``v <- J^T v / ||J^T v||`` (``J^T`` has the spectrum of ``J``) and returns the last
    ``||J^T v||``; exact for a dominant real eigenvalue, an estimate otherwise.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    z_leaf = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = step(z_leaf)
    v = torch.randn_like(z)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    radius = z.new_zeros(z.shape[0])
    for _ in range(iterations):
        (w,) = torch.autograd.grad(fz, z_leaf, v, retain_graph=True)
        radius = w.norm(dim=-1)
        v = w / radius.clamp(min=1e-30).unsqueeze(-1)
    return radius.detach()


@dataclass(frozen=True)
class JacobianRegularization:
    """The penalty ``weight * mean_b ||J_f(z*_b)||_F^2 / d`` (Bai et al. 2021), Hutchinson
    estimate with ``samples`` Gaussian probes.

    It holds no schedule: which training steps carry it (a fraction of them, until an epoch) is
    the training loop's choice (``deq_attacks.training.build.JacobianSchedule``); a step that
    carries it calls ``DEQ.forward_with_penalty(x, regularization)``.

    Args:
        weight: penalty weight, >= 0 (paper: 0.4).
        samples: Hutchinson probes per application.
    """

    weight: float = 0.4
    samples: int = 1

    def __post_init__(self) -> None:
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight < 0
        ):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {self.samples!r}")

    def penalty(self, step: StepFn, z_star: Tensor) -> Tensor:
        """The weighted, dimension-normalised penalty at ``z_star`` (B, d): a scalar,
        differentiable in the parameters. ``f`` runs eagerly here even where it was compiled
        (``torch.compile`` has no double backward, which the penalty's gradient needs)."""
        if not torch.is_grad_enabled():
            raise RuntimeError("the Jacobian penalty is a training loss: enable gradients")
        with torch.compiler.set_stance("force_eager"):
            frob = hutchinson_frobenius(step, z_star, self.samples, create_graph=True)
        return self.weight * frob.mean() / z_star.shape[-1]
