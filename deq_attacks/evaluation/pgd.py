"""Fixed-step L-inf PGD with a loss-aware estimate: the shared attack run.

It never looks at the defended output (one random start, no early stop, no best-point
choice), so its adversarial examples are the same whichever defense the estimator holds: one
run per gradient estimate scores every defense and every iterate ``z_n``. The random start of
sample i is drawn from its own generator seeded by (seed, i), so a sample's adversary does not
depend on its batch or on how the samples are sharded.
"""

from __future__ import annotations

import numpy as np
import torch

from deq_attacks.evaluation.attacks import ThreatModel
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces import DEQEstimator


def random_start(x: np.ndarray, eps: float, seed: int, first_index: int) -> np.ndarray:
    """``x`` plus a uniform draw in [-eps, eps] per sample, clipped to [0, 1]; sample j of the
    block (global index ``first_index + j``) uses the generator seeded by (seed, index)."""
    noise = np.empty_like(x)
    for j in range(len(x)):
        rng = np.random.default_rng([seed, first_index + j])
        noise[j] = rng.uniform(-eps, eps, size=x.shape[1:])
    return np.clip(x + noise, 0.0, 1.0).astype(x.dtype)


def fixed_step_pgd(
    estimator: DEQEstimator,
    estimate: GradientEstimate,
    x: np.ndarray,
    y: np.ndarray,
    threat: ThreatModel,
    *,
    steps: int | None = None,
    eps: float | None = None,
    seed: int = 0,
    first_index: int = 0,
) -> np.ndarray:
    """Adversarial examples (B, ...) by ``steps`` signed-gradient steps of size ``threat.step``
    (the threat model's steps by default) from a random start (if the threat model asks for
    one), projected to the eps-ball and [0, 1]; gradients from ``estimator.loss_gradient``
    under ``estimate`` (loss evaluated at its surrogate states).

    Args:
        x, y: one batch, float32 in [0, 1] and int labels.
        steps, eps: override the threat model's (for the PGD-100 and large-eps checks).
        seed, first_index: the random start's seed and the batch's first global sample index.
    """
    steps = threat.steps if steps is None else steps
    eps = threat.eps if eps is None else eps
    device = estimator.device
    x0 = torch.as_tensor(x, device=device)
    labels = torch.as_tensor(y, device=device)
    start = random_start(x, eps, seed, first_index) if threat.random_start else x
    x_adv = torch.as_tensor(start, device=device).clone()
    with estimator.using(estimate=estimate):
        for _ in range(steps):
            grad = estimator.loss_gradient(x_adv, labels)
            assert isinstance(grad, torch.Tensor)
            x_adv = x_adv + threat.step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return x_adv.cpu().numpy()
