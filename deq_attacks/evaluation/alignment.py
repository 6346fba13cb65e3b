"""How obfuscated each gradient estimate is on the model at hand: the per-sample cosine between
its loss-aware input gradient and the true gradient of the defended loss (backpropagation
through the solver). ``diagnostics.alignment_check`` judges it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.deq.readout import Final
from deq_attacks.gradients import BackpropThroughSolver, GradientEstimate
from deq_attacks.interfaces import DEQEstimator


@dataclass(frozen=True)
class EstimateAlignment:
    """One estimate against the reference gradient.

    Attributes:
        estimate: ``repr`` of the estimate.
        cosines: per sample (in input order), the cosine between the two input gradients;
            None where either gradient is zero (no direction to compare).
        median: median of the defined cosines (None if none is defined).
        worst: the smallest defined cosine (None if none is defined).
        worst_samples: indices of the samples with the smallest cosines, worst first.
    """

    estimate: str
    cosines: tuple[float | None, ...]
    median: float | None
    worst: float | None
    worst_samples: tuple[int, ...]

    @property
    def undefined(self) -> int:
        """Number of samples whose cosine is undefined."""
        return sum(c is None for c in self.cosines)

    def to_json(self) -> dict[str, object]:
        return {
            "estimate": self.estimate,
            "median": self.median,
            "worst": self.worst,
            "worst_samples": list(self.worst_samples),
            "undefined": self.undefined,
            "cosines": list(self.cosines),
        }


@dataclass(frozen=True)
class AlignmentResult:
    """Per estimate, the cosine of its gradient with the reference, for one defense.

    Attributes:
        defense: ``repr`` of the defense (the estimator's current readout).
        reference: ``repr`` of the reference estimate (backprop through the solver).
        residuals: per sample, the forward solve's relative residual at its last iterate
            (>= ~0.05: the solver has not converged, and the estimates of the paper need not
            agree with the reference).
        estimates: name -> alignment, in the order given.
    """

    defense: str
    reference: str
    residuals: tuple[float, ...]
    estimates: Mapping[str, EstimateAlignment]

    def to_json(self) -> dict[str, object]:
        return {
            "defense": self.defense,
            "reference": self.reference,
            "num_samples": len(self.residuals),
            "median_residual": float(np.median(self.residuals)),
            "residuals": list(self.residuals),
            "estimates": {name: a.to_json() for name, a in self.estimates.items()},
        }


def cosines(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    """Per-sample cosine of two batches (B, ...) of gradients; None where either is zero."""
    a2 = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b2 = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    dots = (a2 * b2).sum(axis=1)
    return [float(d / n) if n > 0 and math.isfinite(n) else None for d, n in zip(dots, norms)]


def _summary(
    estimate: GradientEstimate, values: list[float | None], worst_count: int
) -> EstimateAlignment:
    defined = [(c, i) for i, c in enumerate(values) if c is not None]
    ordered = sorted(defined)
    return EstimateAlignment(
        estimate=repr(estimate),
        cosines=tuple(values),
        median=float(np.median([c for c, _ in defined])) if defined else None,
        worst=ordered[0][0] if ordered else None,
        worst_samples=tuple(i for _, i in ordered[:worst_count]),
    )


def gradient_alignment(
    model: DefendedModel | DEQEstimator,
    estimates: Mapping[str, GradientEstimate],
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 64,
    *,
    reference: GradientEstimate | None = None,
    worst_count: int = 5,
) -> AlignmentResult:
    """Per estimate, the per-sample cosine between its input gradient and the reference's, for
    the model's current defense.

    Both gradients come from ``loss_gradient`` (loss-aware, the model's loss) of views of the
    model with each estimate (``DefendedModel.view``); the cosine ignores the loss's scale.

    Args:
        model: the DEQ under evaluation, a ``DefendedModel`` (a ``DEQEstimator`` is read by
            ``DefendedModel.of``); its current defense is used.
        estimates: name -> estimate to compare (at least one).
        x: inputs (B, *input_shape); y: labels (B,) as class indices.
        batch_size: samples per gradient call.
        reference: the true gradient (default ``BackpropThroughSolver()``).
        worst_count: how many of the worst samples to name per estimate.
    """
    defended = as_defended(model)
    if not estimates:
        raise ValueError("estimates is empty: give at least one name -> GradientEstimate")
    for name, estimate in estimates.items():
        if not isinstance(estimate, GradientEstimate):
            raise TypeError(f"estimates[{name!r}] is not a GradientEstimate: {estimate!r}")
        estimate.check(defended.deq.solver)
    reference = reference if reference is not None else BackpropThroughSolver()
    if not isinstance(reference, GradientEstimate):
        raise TypeError(f"reference must be a GradientEstimate, got {reference!r}")
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"need x (B, ...) and class indices y (B,) with B >= 1, got {x.shape} and {y.shape}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(worst_count, bool) or not isinstance(worst_count, int) or worst_count < 0:
        raise ValueError(f"worst_count must be an int >= 0, got {worst_count!r}")

    values: dict[str, list[float | None]] = {name: [] for name in estimates}
    residuals: list[float] = []
    views = {name: defended.view(estimate) for name, estimate in estimates.items()}
    truth = defended.view(reference)
    for start in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[start : start + batch_size], device=defended.device)
        yb = torch.as_tensor(y[start : start + batch_size], device=defended.device)
        true = truth.loss_gradient(xb, yb).cpu().numpy()
        residuals.extend(_last_residuals(defended, xb).tolist())
        for name, view in views.items():
            values[name].extend(cosines(view.loss_gradient(xb, yb).cpu().numpy(), true))
    return AlignmentResult(
        defense=repr(defended.defense),
        reference=repr(reference),
        residuals=tuple(residuals),
        estimates={
            name: _summary(estimates[name], values[name], worst_count) for name in estimates
        },
    )


def _last_residuals(model: DefendedModel, x: Tensor) -> np.ndarray:
    """Relative residual (B,) of each sample's last forward iterate, from its own solve (of the
    preprocessed input, as the DEQ receives it)."""
    with torch.no_grad():  # the whole solve
        _, residuals = model.view(defense=Final()).white_box.defended(model.preprocess(x))
    return residuals.double().cpu().numpy()
