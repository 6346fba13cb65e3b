"""Per-epoch measurements on the development split: clean and ready-made PGD-10 accuracy (the
checkpoint choice), and for DEQs the mean relative residual of every state z_n and the spectral
radius of J_f at z* (the traces of Fig. 12/13)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deq_attacks.acceleration import Acceleration
from deq_attacks.deq import DEQ, spectral_radius
from deq_attacks.training.adversary import Budget, make_adversary
from deq_attacks.training.config import TrainConfig


def _batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def evaluate_dev(
    model: nn.Module,
    dev_x: Tensor,
    dev_y: Tensor,
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    acceleration: Acceleration,
) -> dict[str, Any]:
    """Clean and PGD accuracy on the dev split (``config.threat.adversary``'s PGD with the
    training gradient, random start, in batches of ``config.execution.dev_batch_size``),
    residual per state and spectral radius, under the acceleration's precision; the model is
    left in eval mode."""
    model.eval()
    shape = tuple(int(s) for s in dev_x.shape[1:])
    correct, adv_correct = 0, 0
    residual_sums: Tensor | None = None
    batch = config.execution.dev_batch_size
    budget = Budget(
        config.threat.eps, config.threat.step, config.threat.steps, True, config.threat.norm
    )
    adversary = make_adversary(
        config.threat.adversary,
        model,
        budget,
        shape,  # type: ignore[arg-type]
        num_classes,
        device,
        batch,
    )
    for x, y in _batches(dev_x, dev_y, batch):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), acceleration.autocast(device):
            correct += int((model(acceleration.inputs(x)).argmax(1) == y).sum())
        if isinstance(model, DEQ):
            trajectory = model.last_trajectory
            assert trajectory is not None
            per_state = torch.stack(
                [trajectory.residual(n) for n in range(1, model.solver.threshold + 1)], dim=1
            ).sum(0)
            residual_sums = per_state if residual_sums is None else residual_sums + per_state
        with acceleration.autocast(device):
            x_adv = adversary(x, y)
        with torch.no_grad(), acceleration.autocast(device):
            adv_correct += int((model(acceleration.inputs(x_adv)).argmax(1) == y).sum())
    n = len(dev_y)
    record: dict[str, Any] = {
        "dev_clean_accuracy": correct / n,
        "dev_pgd_accuracy": adv_correct / n,
    }
    if isinstance(model, DEQ) and residual_sums is not None:
        record["dev_residuals"] = [float(v) / n for v in residual_sums.float().cpu()]
        if config.execution.spectral_samples > 0:
            record["dev_spectral_radius"] = dev_spectral_radius(
                model, dev_x[: config.execution.spectral_samples].to(device)
            )
    return record


def dev_spectral_radius(deq: DEQ, x: Tensor, iterations: int = 20) -> float:
    """Mean over samples of the power-iteration spectral radius of J_f at the solver's z*."""
    with torch.no_grad():
        injection = deq.inject(x)
        z_star = deq.solve(injection).final
    radius = spectral_radius(lambda z: deq.step(z, injection), z_star, iterations)
    return float(radius.mean())
