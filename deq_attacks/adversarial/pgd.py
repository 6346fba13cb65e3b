"""The one fixed-step PGD (L-inf or L2) of the package, in torch: the protocol's shared run and
the training adversary.

It never looks at the model's output (one start, no early stop, no best-point choice). Each
step is ART's ``ProjectedGradientDescent`` step in ART's arithmetic (step, clip to [0, 1],
then project the perturbation onto the eps-ball), so from the same start the two give the same
points (tested to 1e-5; for L-inf bit for bit). Two ways to draw the start: ``random_start``
per sample from its own generator (the protocol's: independent of batch and shard) and
``art_random_start`` from numpy's global generator as ART draws it (the training adversary's:
its PGD-AT reproduces the one through ART). Unlike ART, a NaN gradient is not replaced by 0:
the point becomes NaN, and a defense whose logits are not finite counts as broken.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from art.utils import random_sphere
from torch import Tensor

from deq_attacks.acceleration import compiled_f
from deq_attacks.adversarial.defended import DefendedModel, check_draws
from deq_attacks.adversarial.seeds import SampleSeeds
from deq_attacks.deq import DEQ

Gradient = Callable[[Tensor, Tensor], Tensor]
"""``gradient(x (B, ...), labels (B,)) -> dL/dx (B, ...)``: the loss gradient PGD ascends."""

NORMS = ("Linf", "L2")

#: ART's ``norm`` argument of each norm.
ART_NORMS = {"Linf": np.inf, "L2": 2}


def check_norm(norm: str) -> str:
    """``norm`` if it is one of ``NORMS``, else a ValueError naming them."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def random_start(x: np.ndarray, eps: float, seeds: SampleSeeds, norm: str = "Linf") -> np.ndarray:
    """``x`` plus a draw uniform in the eps-ball of ``norm`` per sample, clipped to [0, 1]
    (L-inf: uniform in [-eps, eps] per pixel; L2: a Gaussian direction scaled to radius
    ``eps * u ** (1 / d)``, u uniform in [0, 1]); row j draws from ``seeds.start(j)`` (seeded by
    (seed, global index of row j))."""
    noise = np.empty_like(x)
    size = int(np.prod(x.shape[1:]))
    for j in range(len(x)):
        rng = seeds.start(j)
        if norm == "Linf":
            noise[j] = rng.uniform(-eps, eps, size=x.shape[1:])
        else:
            direction = rng.standard_normal(size=x.shape[1:])
            radius = eps * rng.uniform() ** (1.0 / size)
            noise[j] = radius * direction / max(float(np.linalg.norm(direction)), 1e-12)
    return np.clip(x + noise, 0.0, 1.0).astype(x.dtype)


def art_random_start(x: Tensor, eps: float, norm: str = "Linf") -> Tensor:
    """``x`` (B, ...) plus ART's random start, drawn as ``ProjectedGradientDescent`` draws it
    (``art.utils.random_sphere`` over numpy's global generator, one (B, D) draw), float32,
    clipped to [0, 1]."""
    size = int(np.prod(x.shape[1:]))
    noise = random_sphere(len(x), size, eps, ART_NORMS[check_norm(norm)])
    noise_t = torch.from_numpy(noise.reshape(x.shape).astype(np.float32)).to(x.device)
    return (x + noise_t).clamp(0.0, 1.0)


def signed_step(x_adv: Tensor, grad: Tensor, x0: Tensor, eps: float, step: float) -> Tensor:
    """One L-inf PGD step: ``x_adv + step * sign(grad)`` clipped to [0, 1], then the
    perturbation from ``x0`` clipped to [-eps, eps] (ART's order)."""
    x_adv = (x_adv + step * grad.sign()).clamp(0.0, 1.0)
    return x0 + (x_adv - x0).clamp(-eps, eps)


def l2_step(x_adv: Tensor, grad: Tensor, x0: Tensor, eps: float, step: float) -> Tensor:
    """One L2 PGD step, in ART's order: ``x_adv + step * grad / ||grad||_2`` (per sample; a
    zero gradient does not move) clipped to [0, 1], then the perturbation from ``x0`` scaled
    back to L2 length ``eps`` if longer (a shrink towards ``x0``, so it stays in [0, 1])."""
    shape = (-1, *[1] * (grad.dim() - 1))
    norms = grad.flatten(1).norm(dim=1).view(shape)
    x_adv = (x_adv + step * grad / torch.where(norms > 0, norms, 1.0)).clamp(0.0, 1.0)
    delta = x_adv - x0
    length = delta.flatten(1).norm(dim=1).view(shape)
    return x0 + delta * torch.clamp(eps / length.clamp_min(1e-12), max=1.0)


#: The PGD step of each norm.
STEPS = {"Linf": signed_step, "L2": l2_step}


@functools.cache
def compiled_step(backend: str, norm: str) -> Any:
    """The step of ``norm`` through ``torch.compile`` with ``backend`` (built once)."""
    return torch.compile(STEPS[norm], backend=backend, dynamic=True)


_COMPILED_DEQS: weakref.WeakKeyDictionary[DEQ, dict[str, DEQ]] = weakref.WeakKeyDictionary()


def compiled(model: DefendedModel, backend: str) -> DefendedModel:
    """``model`` (its estimate, defense, loss, preprocessing) over a DEQ that shares every
    module and parameter of ``model.deq`` but runs f through ``torch.compile``
    (``deq_attacks.acceleration.compiled_f``); that DEQ is built once per DEQ and backend."""
    deq = model.deq
    if not isinstance(deq, DEQ):
        raise TypeError(f"compiling f needs a deq_attacks.DEQ, got {type(deq).__name__}")
    cache = _COMPILED_DEQS.setdefault(deq, {})
    if backend not in cache:
        cache[backend] = compiled_f(deq, backend)
    return model.view(deq=cache[backend])


def pgd(
    gradient: Gradient,
    x0: Tensor,
    labels: Tensor,
    start: Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    norm: str = "Linf",
    eot_draws: int = 1,
    step_fn: Callable[[Tensor, Tensor, Tensor, float, float], Tensor] | None = None,
    on_step: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """``steps`` PGD steps of size ``step`` in ``norm`` (L-inf: signed gradient; L2:
    normalised gradient) from ``start``, each projected to the ``eps``-ball around ``x0``
    and to [0, 1]; returns the last iterate (B, ...).

    Args:
        gradient: the loss gradient to ascend (``Gradient``).
        x0, labels: the clean batch (B, ...) in [0, 1] and its class indices (B,).
        start: the first iterate (B, ...), e.g. ``x0``, ``random_start`` or
            ``art_random_start``.
        eot_draws: expectation over transformation: each step's gradient is the mean of this
            many calls (a randomized model draws anew in each); 1 is one call.
        step_fn: the step (default ``STEPS[norm]``; e.g. ``compiled_step``).
        on_step: called with the start and then with the iterate after each step.
    """
    check_draws(eot_draws)
    step_fn = step_fn or STEPS[check_norm(norm)]
    x_adv = start.detach().clone()
    if on_step is not None:
        on_step(x_adv)
    for _ in range(steps):
        grad = gradient(x_adv, labels)
        for _ in range(eot_draws - 1):
            grad = grad + gradient(x_adv, labels)
        if eot_draws > 1:
            grad = grad / eot_draws
        x_adv = step_fn(x_adv, grad.to(x_adv.dtype), x0, eps, step)
        if on_step is not None:
            on_step(x_adv)
    return x_adv
