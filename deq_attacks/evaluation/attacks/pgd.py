"""Fixed-step PGD (L-inf or L2) with a loss-aware estimate: the shared attack run.

It never looks at the defended output (one random start, no early stop, no best-point
choice), so its adversarial examples are the same whichever defense the estimator holds: one
run per gradient estimate scores every defense and every iterate ``z_n``. The random start of
sample i is drawn from its own generator seeded by (seed, i), so a sample's adversary does not
depend on its batch or on how the samples are sharded.

With ``compile_backend`` the sign step and f run through ``torch.compile`` (``compiled``):
``"inductor"`` on a GPU; ``"eager"`` or ``"aot_eager"`` check the path on a CPU.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from deq_attacks.acceleration import compiled_f
from deq_attacks.deq import DEQ
from deq_attacks.evaluation.attacks.base import Attack, AttackOutput, register_attack
from deq_attacks.evaluation.attacks.defended import check_draws
from deq_attacks.evaluation.attacks.seeds import SampleSeeds
from deq_attacks.evaluation.threat import ThreatModel
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces import DEQEstimator


def random_start(
    x: np.ndarray, eps: float, seeds: SampleSeeds, norm: str = "Linf"
) -> np.ndarray:
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


def signed_step(x_adv: Tensor, grad: Tensor, x0: Tensor, eps: float, step: float) -> Tensor:
    """One L-inf PGD step: ``x_adv + step * sign(grad)`` projected to the eps-ball around
    ``x0`` and to [0, 1]."""
    x_adv = x_adv + step * grad.sign()
    return torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)


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
def _compiled_step(backend: str, norm: str) -> Any:
    return torch.compile(STEPS[norm], backend=backend, dynamic=True)


_COMPILED_DEQS: weakref.WeakKeyDictionary[DEQ, dict[str, DEQ]] = weakref.WeakKeyDictionary()


def compiled(estimator: DEQEstimator, backend: str) -> DEQEstimator:
    """A view of ``estimator`` (its estimate, defense, loss, preprocessing) over a DEQ that
    shares every module and parameter of ``estimator.deq`` but runs f through
    ``torch.compile`` (``deq_attacks.acceleration.compiled_f``); built once per DEQ and
    backend."""
    deq = estimator.deq
    if not isinstance(deq, DEQ):
        raise TypeError(f"compiling f needs a deq_attacks.DEQ, got {type(deq).__name__}")
    cache = _COMPILED_DEQS.setdefault(deq, {})
    if backend not in cache:
        cache[backend] = compiled_f(deq, backend)
    return estimator.view(deq=cache[backend])


def fixed_step_pgd(
    estimator: DEQEstimator,
    estimate: GradientEstimate,
    x: np.ndarray,
    y: np.ndarray,
    threat: ThreatModel,
    *,
    steps: int | None = None,
    seed: int | SampleSeeds = 0,
    compile_backend: str = "",
    eot_draws: int = 1,
    on_step: Callable[[Tensor], None] | None = None,
) -> np.ndarray:
    """Adversarial examples (B, ...) by ``steps`` PGD steps of size ``threat.step`` in
    ``threat.norm`` (L-inf: signed gradient; L2: normalised gradient; the threat model's steps
    by default) from a random start (if the threat model asks for one), projected to the
    ``threat.eps``-ball and [0, 1]; gradients from ``loss_gradient`` of a view of
    ``estimator`` with ``estimate`` (loss evaluated at its surrogate states).

    Args:
        x, y: one batch, float32 in [0, 1] and int labels.
        steps: override the threat model's (the more-steps check's PGD).
        seed: the per-sample seeds of the batch, or an int: row j then starts from (seed, j).
        compile_backend: run the step and f through ``torch.compile`` with this backend
            ("" runs them as they are).
        eot_draws: expectation over transformation: each step's gradient is the mean of this
            many ``loss_gradient`` calls (a randomized model draws anew in each); 1 is one call.
        on_step: called with the start and then with the iterate after each step (B, ...).
    """
    check_draws(eot_draws)
    steps = threat.steps if steps is None else steps
    seeds = seed if isinstance(seed, SampleSeeds) else SampleSeeds.first(int(seed), "pgd", len(x))
    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} seeds for {len(x)} samples")
    model = estimator.view(estimate=estimate)
    step_fn = STEPS[threat.norm]
    if compile_backend:
        model = compiled(model, compile_backend)
        step_fn = _compiled_step(compile_backend, threat.norm)
    device = model.device
    x0 = torch.as_tensor(x, device=device)
    labels = torch.as_tensor(y, device=device)
    start = random_start(x, threat.eps, seeds, threat.norm) if threat.random_start else x
    x_adv = torch.as_tensor(start, device=device).clone()
    if on_step is not None:
        on_step(x_adv)
    for _ in range(steps):
        grad = model.loss_gradient(x_adv, labels)
        assert isinstance(grad, torch.Tensor)
        for _ in range(eot_draws - 1):
            draw = model.loss_gradient(x_adv, labels)
            assert isinstance(draw, torch.Tensor)
            grad = grad + draw
        if eot_draws > 1:
            grad = grad / eot_draws
        x_adv = step_fn(x_adv, grad.to(x_adv.dtype), x0, threat.eps, threat.step)
        if on_step is not None:
            on_step(x_adv)
    return x_adv.cpu().numpy()


@register_attack("pgd")
@dataclass(frozen=True)
class FixedStepPGD(Attack):
    """The fixed-step, loss-aware PGD of the threat model (one random start, no early stop):
    one shared run per estimate scores every defense.

    Args:
        steps: iterations (None: the threat model's); its spec: ``pgd:steps=20``.
        compile_backend: ``torch.compile`` backend of the step and f ("": none); shared.
        eot_draws: gradients averaged per step (``fixed_step_pgd``); shared.
    """

    label: ClassVar[str] = "PGD"
    shared: ClassVar[bool] = True
    takes: ClassVar[tuple[str, ...]] = ("eot_draws", "compile_backend")
    steps: int | None = None
    compile_backend: str = ""
    eot_draws: int = 1

    def run(
        self,
        model: DEQEstimator,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        x_adv = fixed_step_pgd(
            model, model.gradient_estimate, x, y, threat, steps=self.steps, seed=seeds,
            compile_backend=self.compile_backend, eot_draws=self.eot_draws,
        )  # fmt: skip
        return AttackOutput(x_adv)

    def calls(self, threat: ThreatModel, num_classes: int) -> tuple[float, float]:
        return 0.0, float(threat.steps if self.steps is None else self.steps)

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        return {
            "budget": threat.steps if self.steps is None else self.steps,
            "step": threat.step,
            "random_start": threat.random_start,
            "restarts": 1,
            "compile_backend": self.compile_backend or None,
            "eot_draws": self.eot_draws,
        }
