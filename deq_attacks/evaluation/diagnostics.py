"""Diagnostics with verdicts: each check says "pass" or "flag" and gives its numbers.

Signals of gradient obfuscation (Athalye et al. 2018; Carlini et al. 2019; Croce & Hein 2020's
flags) and of an unreliable forward or backward solve, per sample where the check is per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deq_attacks.deq.convergence import RESIDUAL_LIMIT
from deq_attacks.evaluation.attacks import DefendedModel
from deq_attacks.evaluation.scoring import model_input
from deq_attacks.gradients import Exact, GradientEstimate
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.solvers import Trajectory

BACKWARD_RESIDUAL_LIMIT = 0.05
"""Relative residual above which an Exact backward (adjoint) solve counts as not converged."""
SCALE_COSINE_LIMIT = 0.99
"""An Exact gradient whose direction changes more than this when only the loss scale changes
(cosine below it) is arbitrary."""
SQUARE_MARGIN = 0.002
"""AutoAttack's check_square_sr margin: Square beating the gradient attacks by more flags."""
LARGE_EPS_LIMIT = 0.05
"""Accuracy at a large eps above this flags (it should fall to about 0)."""
ACCUMULATION_MARGIN = 0.02
"""An iterate more robust than the last one by more than this flags robustness accumulation."""


@dataclass
class Check:
    """One diagnostic: its verdict ("pass" or "flag"), a sentence, and its numbers."""

    name: str
    verdict: str
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verdict(flagged: bool) -> str:
    return "flag" if flagged else "pass"


def square_check(column_accuracy: Mapping[str, Mapping[str, float]], square: str) -> Check:
    """Per defense: does Square (a query attack) beat every gradient attack?"""
    beaten = {}
    for defense, cells in column_accuracy.items():
        gradient = [v for k, v in cells.items() if k != square]
        if square in cells and gradient and cells[square] < min(gradient) - SQUARE_MARGIN:
            beaten[defense] = {"square": cells[square], "best_gradient": min(gradient)}
    message = (
        "Square beats every gradient attack for "
        + ", ".join(
            f"{d} ({100 * v['square']:.1f} < {100 * v['best_gradient']:.1f}%)"
            for d, v in beaten.items()
        )  # fmt: skip
        + ": the gradients are obfuscated"
        if beaten
        else "Square beats no defense's best gradient attack"
    )
    return Check("square_beats_gradient", verdict(bool(beaten)), message, {"defenses": beaten})


def more_steps_check(
    short: Mapping[str, np.ndarray], long: Mapping[str, np.ndarray], steps: tuple[int, int]
) -> Check:
    """Per defense: does PGD with more steps leave accuracy higher (per-sample survival)?"""
    numbers = {}
    flagged = False
    for defense in short:
        a, b = float(short[defense].mean()), float(long[defense].mean())
        only_long = int((long[defense] & ~short[defense]).sum())
        numbers[defense] = {
            f"pgd{steps[0]}": a,
            f"pgd{steps[1]}": b,
            "survive_long_only": only_long,
        }
        flagged |= b > a
    pairs = ", ".join(
        f"{d} {100 * v[f'pgd{steps[0]}']:.1f} -> {100 * v[f'pgd{steps[1]}']:.1f}%"
        for d, v in numbers.items()
    )
    message = (
        f"PGD-{steps[1]} leaves a higher accuracy than PGD-{steps[0]} ({pairs}): the attack "
        "does not converge, or the loss surface misleads it"
        if flagged
        else f"PGD-{steps[1]} is at most PGD-{steps[0]} for every defense ({pairs})"
    )
    return Check("more_steps_lower_accuracy", verdict(flagged), message, numbers)


def large_eps_check(scores: Mapping[str, np.ndarray], eps: float) -> Check:
    """At a large eps, does the accuracy fall to about 0 for every defense?"""
    numbers = {d: float(v.mean()) for d, v in scores.items()}
    high = {d: a for d, a in numbers.items() if a > LARGE_EPS_LIMIT}
    accuracies = ", ".join(f"{d} {100 * a:.1f}%" for d, a in numbers.items())
    message = (
        f"accuracy stays above {LARGE_EPS_LIMIT:.0%} at eps={eps} ({accuracies})"
        if high
        else f"accuracy falls to <= {LARGE_EPS_LIMIT:.0%} at eps={eps} ({accuracies})"
    )
    return Check("large_eps_accuracy", verdict(bool(high)), message, {"eps": eps, **numbers})


def accumulation_check(state_correct: np.ndarray, margin: float = ACCUMULATION_MARGIN) -> Check:
    """Robustness accumulation (Fig. 2a): is an intermediate iterate more robust than the last
    one under the ready-made attack? ``state_correct`` bool (S, N)."""
    accuracy = state_correct.mean(axis=0)
    best = int(np.argmax(accuracy)) + 1
    flagged = bool(accuracy.max() > accuracy[-1] + margin)
    message = (
        f"z_{best} is more robust ({100 * accuracy.max():.1f}%) than the last iterate "
        f"({100 * accuracy[-1]:.1f}%) under the ready-made attack: the ready-made gradient "
        "does not reach the intermediate states"
        if flagged
        else f"no iterate is more robust than the last one by over {100 * margin:.0f} points"
    )
    return Check(
        "robustness_accumulation", verdict(flagged), message, {"per_state": accuracy.tolist()}
    )


def forward_convergence_check(final_residual: np.ndarray) -> Check:
    """Samples whose forward solve ended above the residual limit (per sample)."""
    bad = np.flatnonzero(final_residual > RESIDUAL_LIMIT)
    numbers = {
        "limit": RESIDUAL_LIMIT,
        "mean_residual": float(final_residual.mean()),
        "max_residual": float(final_residual.max()),
        "samples": bad.tolist(),
    }
    message = (
        f"{len(bad)} of {len(final_residual)} samples' forward solves ended above a relative "
        f"residual of {RESIDUAL_LIMIT} (mean {final_residual.mean():.3f}, max "
        f"{final_residual.max():.3f})"
    )
    return Check("forward_not_converged", verdict(bool(len(bad))), message, numbers)


#: Relative logit difference (alone vs in a batch) counted as batch dependence, per device
#: type: float32 CPU kernels agree to about 1e-6; GPU kernels (TF32, algorithms chosen by batch
#: size) differ by about 1e-4 (measured 1.5e-4 on an H100) for identical inputs.
BATCH_TOLERANCE = {"cpu": 1e-4, "cuda": 2e-3}


def batch_and_randomness_check(
    estimator: DEQEstimator, x: np.ndarray, batch_size: int
) -> tuple[Check, Check]:
    """Does a sample's output depend on its batch (alone vs together, beyond the device's
    float tolerance ``BATCH_TOLERANCE``, or any prediction changes)? Do repeated forwards
    differ?"""
    tolerance = BATCH_TOLERANCE.get(estimator.device.type, max(BATCH_TOLERANCE.values()))
    together = estimator.predict(x, batch_size=batch_size)
    again = estimator.predict(x, batch_size=batch_size)
    alone = np.concatenate([estimator.predict(x[i : i + 1]) for i in range(len(x))])
    scale = np.abs(together).max() + 1e-12
    batch_diff = float(np.abs(together - alone).max() / scale)
    batch_flips = int((together.argmax(1) != alone.argmax(1)).sum())
    random_diff = float(np.abs(together - again).max() / scale)
    batch = Check(
        "output_depends_on_batch",
        verdict(batch_flips > 0 or batch_diff > tolerance),
        f"relative logit difference alone vs in a batch {batch_diff:.1e} (tolerance "
        f"{tolerance:.0e} on {estimator.device.type}), {batch_flips} predictions change",
        {"relative_difference": batch_diff, "prediction_changes": batch_flips, "samples": len(x),
         "tolerance": tolerance},  # fmt: skip
    )
    random = Check(
        "randomized_output",
        verdict(random_diff > 1e-6),
        f"relative logit difference between two identical forwards {random_diff:.1e}",
        {"relative_difference": random_diff},
    )
    return batch, random


def gradient_health_check(
    estimator: DEQEstimator, estimates: Mapping[str, GradientEstimate], x: np.ndarray, y: np.ndarray
) -> Check:
    """Per estimate: samples whose loss gradient is zero or not finite."""
    numbers = {}
    flagged = False
    for label, estimate in estimates.items():
        with estimator.using(estimate=estimate):
            grad = np.asarray(estimator.loss_gradient(x, y)).reshape(len(x), -1)
        zero = np.flatnonzero(np.abs(grad).sum(1) == 0).tolist()
        bad = np.flatnonzero(~np.isfinite(grad).all(1)).tolist()
        numbers[label] = {"zero": zero, "not_finite": bad}
        flagged |= bool(zero or bad)
    counts = ", ".join(
        f"{k}: {len(v['zero'])} zero / {len(v['not_finite'])} NaN-inf" for k, v in numbers.items()
    )
    return Check("zero_or_nan_gradients", verdict(flagged), counts, numbers)


def backward_residuals(trajectory: Trajectory | None) -> np.ndarray:
    """Per-sample relative residual of the answer of an adjoint (backward) solve (the best
    iterate's). The one place that reads the backward solve's record."""
    if trajectory is None:
        raise RuntimeError("no backward solve was recorded")
    return trajectory.residuals.min(dim=1).values.detach().cpu().numpy()


def _exact_gradient(
    estimator: DEQEstimator, exact: Exact, x: Tensor, y: Tensor, scale: float
) -> tuple[Tensor, np.ndarray]:
    """dL/dx by Exact through the autograd path for ``scale * sum of cross-entropies``, and the
    backward solve's per-sample residuals."""
    model = DefendedModel(estimator)
    solves: list[Trajectory] = []
    exact = dataclasses.replace(exact, on_backward=solves.append)
    with estimator.using(estimate=exact):
        x_leaf = x.detach().clone().requires_grad_()
        loss = scale * torch.nn.functional.cross_entropy(model(x_leaf), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_leaf)
    return grad.detach(), backward_residuals(solves[-1] if solves else None)


def exact_backward_check(
    estimator: DEQEstimator, exact: Exact, x: np.ndarray, y: np.ndarray
) -> Check:
    """Per sample: did the Exact backward solve converge, and does the Exact gradient keep its
    direction when only the loss scale changes (x1 vs x1e-3)? Either failing makes that
    sample's Exact gradient arbitrary."""
    xt = torch.as_tensor(x, device=estimator.device)
    yt = torch.as_tensor(y, device=estimator.device)
    grad_1, residual = _exact_gradient(estimator, exact, xt, yt, 1.0)
    grad_small, _ = _exact_gradient(estimator, exact, xt, yt, 1e-3)
    cosine = (
        torch.nn.functional.cosine_similarity(grad_1.flatten(1), grad_small.flatten(1), dim=1)
        .cpu()
        .numpy()
    )
    unconverged = np.flatnonzero(residual > BACKWARD_RESIDUAL_LIMIT)
    unstable = np.flatnonzero(cosine < SCALE_COSINE_LIMIT)
    arbitrary = sorted(set(unconverged.tolist()) | set(unstable.tolist()))
    message = (
        f"{len(unconverged)} of {len(x)} samples' Exact backward solves did not converge "
        f"(residual > {BACKWARD_RESIDUAL_LIMIT}, max {residual.max():.2g}), {len(unstable)} "
        f"change direction with the loss scale (cosine < {SCALE_COSINE_LIMIT}, min "
        f"{cosine.min():.3f})"
        + (f": the Exact gradients of samples {arbitrary} are arbitrary" if arbitrary else "")
    )
    numbers = {
        "backward_residual": residual.tolist(),
        "scale_cosine": cosine.tolist(),
        "arbitrary_samples": arbitrary,
    }
    return Check("exact_backward_not_converged", verdict(bool(arbitrary)), message, numbers)


def spectral_radius(estimator: DEQEstimator, x: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Per-sample estimate of the spectral radius of J_f at the solver's answer, by power
    iteration with vector-Jacobian products (J_f^T has the same spectrum)."""
    deq = estimator.deq
    with torch.no_grad():
        xb = model_input(estimator, x)
        injection = deq.inject(xb)
        z_star = deq.solve(injection).final
    z_leaf = z_star.detach().requires_grad_()
    with torch.enable_grad():
        fz = deq.step(z_leaf, injection)
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z_star.shape, generator=generator).to(z_star)
    v = v / v.norm(dim=1, keepdim=True)
    rho = torch.zeros(len(x))
    for _ in range(iterations):
        (w,) = torch.autograd.grad(fz, z_leaf, v, retain_graph=True)
        rho = w.norm(dim=1).detach().cpu()
        v = w / w.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return rho.numpy()
