"""The protocol's fixed-step PGD column (L-inf or L2) with a loss-aware estimate: the shared
attack run, over the attack layer's ``pgd`` (``deq_attacks.adversarial``).

It never looks at the defended output (one random start, no early stop, no best-point
choice), so its adversarial examples are the same whichever defense the model holds: one
run per gradient estimate scores every defense and every iterate ``z_n``. The random start of
sample i is drawn from its own generator seeded by (seed, i), so a sample's adversary does not
depend on its batch or on how the samples are sharded.

With ``compile_backend`` the sign step and f run through ``torch.compile`` (``compiled``):
``"inductor"`` on a GPU; ``"eager"`` or ``"aot_eager"`` check the path on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from deq_attacks.adversarial import (
    DefendedModel,
    SampleSeeds,
    as_defended,
    compiled,
    compiled_step,
    pgd,
    random_start,
)
from deq_attacks.evaluation.attacks.base import Attack, AttackOutput, register_attack
from deq_attacks.evaluation.threat import ThreatModel
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces import DEQEstimator


def fixed_step_pgd(
    model: DefendedModel | DEQEstimator,
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
    ``threat.eps``-ball and [0, 1] (``deq_attacks.adversarial.pgd``); gradients from
    ``model.loss_gradient`` with ``estimate`` (a view only if ``model`` holds another; the
    loss evaluated at the estimate's surrogate states).

    Args:
        model: the defended model (an ART ``DEQEstimator`` is read by ``DefendedModel.of``).
        x, y: one batch, float32 in [0, 1] and int labels.
        steps: override the threat model's (the more-steps check's PGD).
        seed: the per-sample seeds of the batch, or an int: row j then starts from (seed, j).
        compile_backend: run the step and f through ``torch.compile`` with this backend
            ("" runs them as they are).
        eot_draws: expectation over transformation: each step's gradient is the mean of this
            many gradient calls (a randomized model draws anew in each); 1 is one call.
        on_step: called with the start and then with the iterate after each step (B, ...).
    """
    seeds = seed if isinstance(seed, SampleSeeds) else SampleSeeds.first(int(seed), "pgd", len(x))
    defended = as_defended(model)
    if estimate != defended.estimate:
        defended = defended.view(estimate)
    attack = FixedStepPGD(steps, compile_backend, eot_draws)
    return attack.run(defended, x, y, threat, seeds, on_step=on_step).x_adv


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
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
        on_step: Callable[[Tensor], None] | None = None,
    ) -> AttackOutput:
        """The PGD on one block with ``model``'s estimate (``fixed_step_pgd`` documents it);
        ``on_step`` is called with the start and each iterate."""
        if len(seeds) != len(x):
            raise ValueError(f"{len(seeds)} seeds for {len(x)} samples")
        step_fn = None
        if self.compile_backend:
            model = compiled(model, self.compile_backend)
            step_fn = compiled_step(self.compile_backend, threat.norm)
        device = model.device
        x0 = torch.as_tensor(x, device=device)
        start = random_start(x, threat.eps, seeds, threat.norm) if threat.random_start else x
        x_adv = pgd(
            model.loss_gradient, x0, torch.as_tensor(y, device=device),
            torch.as_tensor(start, device=device), eps=threat.eps, step=threat.step,
            steps=threat.steps if self.steps is None else self.steps, norm=threat.norm,
            eot_draws=self.eot_draws, step_fn=step_fn, on_step=on_step,
        )  # fmt: skip
        return AttackOutput(x_adv.cpu().numpy())

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
