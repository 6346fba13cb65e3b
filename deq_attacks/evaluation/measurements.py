"""The measurements the diagnostics judge, each as plain numbers: forwards alone and in a batch,
every estimate's gradient health, the Exact backward solve, the spectral radius of J_f at the
solver's answer and the alignment of each estimate with the true gradient; for the indicators
of attack failure (Pintor et al. 2022), the ready-made PGD's path (loss and prediction at every
step), predictions under tiny noise, the random-noise baseline (Carlini et al. 2019) and the
gradient calls inside one forward (AutoAttack's dynamic-defense check). (The attack runs they
judge, PGD-100 and the large-eps PGD, are shared PGD runs of the protocol.)

Each measures the protocol's defended model (``DefendedModel``); every switch of estimate or
defense is a view of it (``DefendedModel.view``), and the model itself is never changed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pyautoattack import checks as autoattack_checks
from torch import Tensor

from deq_attacks.deq import spectral_radius
from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.alignment import gradient_alignment
from deq_attacks.evaluation.attacks import (
    DefendedModel,
    SampleSeeds,
    ThreatModel,
    fixed_step_pgd,
    precision,
)
from deq_attacks.evaluation.columns import BPTT, READY_MADE
from deq_attacks.evaluation.context import RunContext
from deq_attacks.evaluation.scores import Scores
from deq_attacks.evaluation.scoring import defended_logits, model_input, score_readouts
from deq_attacks.gradients import Exact, GradientEstimate
from deq_attacks.solvers import Trajectory

UNSTABLE_NOISE = 0.01
"""The tiny noise of the unstable-predictions measurement, as a fraction of the eps."""


def batch_outputs(model: DefendedModel, x: np.ndarray, batch_size: int) -> dict[str, Any]:
    """How much a sample's logits change alone vs in its batch, and between two identical
    forwards (relative to the largest logit), and how many predictions change."""
    together = defended_logits(model, x, batch_size)
    again = defended_logits(model, x, batch_size)
    alone = np.concatenate([defended_logits(model, x[i : i + 1]) for i in range(len(x))])
    scale = np.abs(together).max() + 1e-12
    return {
        "relative_difference": float(np.abs(together - alone).max() / scale),
        "prediction_changes": int((together.argmax(1) != alone.argmax(1)).sum()),
        "repeat_difference": float(np.abs(together - again).max() / scale),
        "samples": len(x),
        "device": model.device.type,
    }


def repeated_forwards(
    model: DefendedModel, x: np.ndarray, batch_size: int, repeats: int = 8
) -> dict[str, Any]:
    """``repeats`` identical forwards of ``x``: the largest logit difference from the first,
    relative to its largest logit, and how many predictions change in some forward (a
    randomized model's outputs differ). Several forwards, not two: a randomized threshold with
    two values draws the same one twice half the time."""
    first = defended_logits(model, x, batch_size)
    difference, changed = 0.0, np.zeros(len(x), dtype=bool)
    for _ in range(repeats - 1):
        again = defended_logits(model, x, batch_size)
        difference = max(difference, float(np.abs(first - again).max(initial=0.0)))
        changed |= first.argmax(1) != again.argmax(1)
    scale = np.abs(first).max(initial=0.0) + 1e-12
    return {
        "relative_difference": difference / scale,
        "prediction_changes": int(changed.sum()),
        "samples": len(x),
        "forwards": repeats,
    }


def attack_path(
    model: DefendedModel,
    estimate: GradientEstimate,
    x: np.ndarray,
    y: np.ndarray,
    threat: ThreatModel,
    steps: int,
    seeds: SampleSeeds,
    eot_draws: int = 1,
) -> dict[str, list[list[float]]]:
    """The fixed-step PGD with ``estimate`` and ``steps`` steps (``fixed_step_pgd``, the
    given seeds), followed point by point: per sample, at the start and after each step, the
    cross-entropy of the model's defended logits (``"loss"``, (S, steps + 1)) and whether
    its prediction is correct (``"correct"``)."""
    labels = torch.as_tensor(y, device=model.device)
    losses: list[np.ndarray] = []
    correct: list[np.ndarray] = []

    def follow(x_adv: Tensor) -> None:
        with torch.no_grad():
            logits = model(x_adv)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        losses.append(loss.cpu().numpy())
        correct.append((logits.argmax(1) == labels).cpu().numpy())

    fixed_step_pgd(
        model, estimate, x, y, threat, steps=steps, seed=seeds, eot_draws=eot_draws,
        on_step=follow,
    )  # fmt: skip
    return {
        "loss": np.stack(losses, axis=1).tolist(),
        "correct": np.stack(correct, axis=1).astype(bool).tolist(),
    }


def unstable_predictions(
    model: DefendedModel, x: np.ndarray, noise: float, seeds: SampleSeeds, draws: int = 10
) -> dict[str, Any]:
    """Per sample, in how many of ``draws`` uniform perturbations of size ``noise`` (L-inf,
    clipped to [0, 1]; sample i's from its own seeds) the prediction differs from the
    unperturbed one."""
    base = defended_logits(model, x).argmax(1)
    changes = np.zeros(len(x), dtype=np.int64)
    for draw in range(draws):
        shaken = np.empty_like(x)
        for row in range(len(x)):
            rng = np.random.default_rng(seeds.sample_seed(row, f"unstable-{draw}"))
            shaken[row] = x[row] + rng.uniform(-noise, noise, size=x.shape[1:])
        changes += defended_logits(model, np.clip(shaken, 0.0, 1.0)).argmax(1) != base
    return {"changes": changes.tolist(), "draws": draws, "noise": noise}


def uniform_noise(x: np.ndarray, eps: float, seeds: SampleSeeds) -> np.ndarray:
    """``x`` plus uniform noise in [-eps, eps] per pixel, clipped to [0, 1]; sample i's from its
    own seeds (the random-noise baseline of Carlini et al. 2019)."""
    noisy = np.empty_like(x)
    for row in range(len(x)):
        rng = np.random.default_rng(seeds.sample_seed(row, "noise"))
        noisy[row] = x[row] + rng.uniform(-eps, eps, size=x.shape[1:])
    return np.clip(noisy, 0.0, 1.0).astype(x.dtype)


def dynamic_calls(model: DefendedModel, x: np.ndarray) -> dict[str, Any]:
    """AutoAttack's dynamic-defense check (pyautoattack's ``checks.check_dynamic``): how often
    a function named ``grad``, ``backward`` or ``_make_grads`` is called during one forward of
    the defended model (a defense that takes gradient steps inside its forward)."""
    counters = autoattack_checks.funcs
    for name in counters:
        counters[name] = 0  # pyautoattack never resets them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autoattack_checks.check_dynamic(model, torch.as_tensor(x, device=model.device))
    calls = dict(counters)
    for name in counters:
        counters[name] = 0
    return {"calls": calls, "samples": len(x)}


def gradient_health(
    model: DefendedModel,
    estimates: Mapping[str, GradientEstimate],
    x: np.ndarray,
    y: np.ndarray,
    x_near: np.ndarray | None = None,
) -> dict[str, dict[str, list[int]]]:
    """Per estimate: the samples whose loss gradient at ``x`` is zero, those where it is not
    finite, and (given ``x_near``, points of the threat model's ball around ``x``) those where
    it is not finite at ``x_near`` (a model may break only away from the clean input)."""
    numbers = {}
    labels = torch.as_tensor(y, device=model.device)

    def gradient(view: DefendedModel, points: np.ndarray) -> np.ndarray:
        grad = view.loss_gradient(torch.as_tensor(points, device=model.device), labels)
        return grad.cpu().numpy().reshape(len(points), -1)

    for label, estimate in estimates.items():
        view = model.view(estimate)
        grad = gradient(view, x)
        numbers[label] = {
            "zero": np.flatnonzero(np.abs(grad).sum(1) == 0).tolist(),
            "not_finite": np.flatnonzero(~np.isfinite(grad).all(1)).tolist(),
        }
        if x_near is not None:
            near = gradient(view, x_near)
            numbers[label]["not_finite_near"] = np.flatnonzero(~np.isfinite(near).all(1)).tolist()
    return numbers


def random_in_ball(x: np.ndarray, eps: float, seed: int) -> np.ndarray:
    """``x`` (S, ...) plus uniform noise in [-eps, eps] from numpy's generator ``seed``,
    clipped to [0, 1] (float32)."""
    noise = np.random.default_rng(seed).uniform(-eps, eps, size=x.shape)
    return np.clip(x + noise, 0.0, 1.0).astype(np.float32)


def backward_residuals(trajectory: Trajectory | None) -> np.ndarray:
    """Per-sample relative residual of the answer of an adjoint (backward) solve (the best
    iterate's). The one place that reads the backward solve's record."""
    if trajectory is None:
        raise RuntimeError("no backward solve was recorded")
    return trajectory.residuals.min(dim=1).values.detach().cpu().numpy()


def _exact_gradient(
    model: DefendedModel, exact: Exact, x: Tensor, y: Tensor, scale: float
) -> tuple[Tensor, np.ndarray]:
    """dL/dx by Exact through the autograd path for ``scale * sum of cross-entropies``, and the
    backward solve's per-sample residuals."""
    solves: list[Trajectory] = []
    recording = dataclasses.replace(exact, on_backward=solves.append)
    x_leaf = x.detach().clone().requires_grad_()
    logits = model.view(recording)(x_leaf)
    loss = scale * torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_leaf)
    return grad.detach(), backward_residuals(solves[-1] if solves else None)


def exact_backward(
    model: DefendedModel, exact: Exact, x: np.ndarray, y: np.ndarray
) -> dict[str, list[float]]:
    """Per sample: the relative residual of the Exact backward solve, and the cosine between
    the Exact gradients of the loss at scale 1 and at scale 1e-3 (equal directions when the
    solve is reliable)."""
    xt = torch.as_tensor(x, device=model.device)
    yt = torch.as_tensor(y, device=model.device)
    grad_1, residual = _exact_gradient(model, exact, xt, yt, 1.0)
    grad_small, _ = _exact_gradient(model, exact, xt, yt, 1e-3)
    cosine = torch.nn.functional.cosine_similarity(grad_1.flatten(1), grad_small.flatten(1), dim=1)
    return {"backward_residual": residual.tolist(), "scale_cosine": cosine.cpu().tolist()}


def spectral_radii(model: DefendedModel, x: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Per-sample spectral radius (S,) of J_f at the solver's answer, by the package's power
    iteration (``deq_attacks.deq.spectral_radius``), started from torch's generator seeded 0
    (restored afterwards), so that the measurement repeats."""
    deq = model.deq
    with torch.no_grad():
        injection = deq.inject(model_input(model, x))
        z_star = deq.solve(injection).final
    devices = [z_star.device] if z_star.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        rho = spectral_radius(lambda z: deq.step(z, injection), z_star, iterations)
    return rho.cpu().numpy()


def alignment(
    model: DefendedModel,
    estimates: Mapping[str, GradientEstimate],
    defenses: Mapping[str, Readout],
    x: np.ndarray,
    y: np.ndarray,
    reference_label: str,
    batch_size: int = 64,
) -> dict[str, dict[str, Any]]:
    """Per defense, every other estimate's per-sample cosine with ``estimates[reference_label]``
    (``gradient_alignment``), as JSON."""
    reference = estimates[reference_label]
    others = {k: v for k, v in estimates.items() if k != reference_label}
    return {
        name: gradient_alignment(
            model.view(defense=readout), others, x, y, batch_size, reference=reference
        ).to_json()
        for name, readout in defenses.items()
    }


def measure(
    ctx: RunContext, estimates: Mapping[str, GradientEstimate], defenses: Mapping[str, Readout]
) -> dict[str, Any]:
    """The measurement runs of a protocol run, each stored: the ready-made PGD with
    ``long_steps`` and at ``large_eps`` on every test sample (per-defense correctness), and on
    the first ``diagnostic_samples`` test samples the batch, gradient (at the clean inputs and
    at a random point of the eps ball around each), Exact-backward,
    alignment (with BPTT) and spectral-radius numbers; with bf16 attacks, the ready-made PGD
    column again in fp32 on the same images."""
    config = ctx.config
    few = slice(0, min(config.diagnostic_samples, len(ctx.x)))
    x, y = ctx.x[few], ctx.y[few]
    ctx.say(f"measurements: PGD-{config.long_steps} and eps={config.large_eps}")
    large = ThreatModel(config.large_eps, config.large_eps / 4, config.steps, norm=config.norm)
    out: dict[str, Any] = {
        "long_pgd": _ready_pgd(ctx, "measure/long-pgd", defenses, ctx.threat, config.long_steps),
        "large_eps": _ready_pgd(ctx, "measure/large-eps", defenses, large, None),
    }
    if config.precision != "fp32":
        ctx.say(f"measurements: the ready-made PGD in fp32 beside {config.precision}")
        fp32 = _ready_pgd(ctx, "measure/fp32", defenses, ctx.threat, None, "fp32")
        out.update(fp32=fp32, fp32_column=f"{READY_MADE} PGD")
    out["randomness"] = ctx.store.get("randomness")
    ctx.say(f"measurements: uniform noise at eps={ctx.threat.eps:g} (random-noise baseline)")
    out["noise"] = _noise_scores(ctx, defenses)
    ctx.say("measurements: batch dependence, gradients, Exact backward, spectral radius")
    stored = {
        "batch": lambda: batch_outputs(ctx.model, x, ctx.batch),
        "gradients": lambda: gradient_health(
            ctx.model, estimates, x, y, random_in_ball(x, ctx.threat.eps, config.seed)
        ),
        "exact_backward": lambda: exact_backward(ctx.model, Exact(), x, y),
        "spectral_radius": lambda: spectral_radii(ctx.model, x),
    }
    if BPTT in estimates:
        stored["alignment"] = lambda: alignment(ctx.model, estimates, defenses, x, y, BPTT)
    rows = np.arange(len(x))
    stored.update(
        path=lambda: attack_path(
            ctx.model, ctx.ready, x, y, ctx.threat, config.long_steps,
            SampleSeeds(config.seed, "pgd", rows), config.eot_draws,
        ),  # fmt: skip
        unstable=lambda: unstable_predictions(
            ctx.model, x, UNSTABLE_NOISE * ctx.threat.eps,
            SampleSeeds(config.seed, "unstable", rows),
        ),  # fmt: skip
        dynamic=lambda: dynamic_calls(ctx.model, x),
    )
    for name, compute in stored.items():
        key = f"measure/{name}"
        found = ctx.store.get(key)
        out[name] = found if found is not None else ctx.store.put(key, compute())
    return out


def _noise_scores(ctx: RunContext, defenses: Mapping[str, Readout]) -> dict[str, np.ndarray]:
    """Every test sample under uniform noise at the threat model's eps (``uniform_noise``),
    block by block and stored: per defense, bool (S,) correct under it."""

    def block(part: np.ndarray) -> dict[str, np.ndarray]:
        seeds = SampleSeeds(ctx.config.seed, "noise", part)
        noisy = uniform_noise(ctx.x[part], ctx.threat.eps, seeds)
        scores = score_readouts(ctx.model, noisy, ctx.y[part], defenses, len(part))
        return Scores(scores.correct, index=part).arrays()

    result = ctx.blockwise("measure/noise", block, np.arange(len(ctx.x)))
    return Scores.from_arrays(result).correct


def _ready_pgd(
    ctx: RunContext,
    key: str,
    defenses: Mapping[str, Readout],
    threat: ThreatModel,
    steps: int | None,
    arithmetic: str | None = None,
) -> dict[str, np.ndarray]:
    """The ready-made fixed-step PGD on every test sample (the shared run's seeds), block by
    block and stored: per defense, bool (S,) correct under it."""
    config = ctx.config
    model = ctx.model.view(ctx.ready)  # one view for every block

    def block(part: np.ndarray) -> dict[str, np.ndarray]:
        with precision(ctx.model.device, arithmetic or config.precision):
            x_adv = fixed_step_pgd(
                model, ctx.ready, ctx.x[part], ctx.y[part], threat, steps=steps,
                seed=SampleSeeds(config.seed, "pgd", part), compile_backend=config.compile_backend,
                eot_draws=config.eot_draws,
            )  # fmt: skip
        scores = score_readouts(ctx.model, x_adv, ctx.y[part], defenses, len(part))
        return Scores(scores.correct, index=part).arrays()

    result = ctx.blockwise(key, block, np.arange(len(ctx.x)))
    return Scores.from_arrays(result).correct
