"""Scoring inputs against every defense and every iterate ``z_n`` from one forward solve, on
the protocol's defended model (``DefendedModel``; an ART ``DEQEstimator`` is read by
``DefendedModel.of``).

The input goes through the model's preprocessing first (the estimator's ART preprocessing, in
torch), as in ``estimator.predict``, so the prediction of ``Early(n)`` here equals ``predict``
under ``Early(n)``.

``correct`` is the one rule of per-sample correctness of every column, mode and aggregation: a
sample whose logits hold a NaN or an infinity is never correct (the argmax of NaN logits is 0,
which would count every class-0 sample robust).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.scores import Scores
from deq_attacks.interfaces import DEQEstimator


def model_input(model: DefendedModel, x: np.ndarray | Tensor) -> Tensor:
    """``x`` after the model's preprocessing, as a float32 tensor on its device (what the DEQ
    sees in ``predict``), without a gradient."""
    with torch.no_grad():
        processed = model.preprocess(torch.as_tensor(x, device=model.device).detach())
    return processed.float()


def defended_logits(model: DefendedModel, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The defended logits (N, nb_classes) float32 of ``x`` (N, ...), ``batch_size`` samples
    per forward, without a gradient: ``predict``'s numbers, from the defended model."""
    outputs = [np.zeros((0, model.nb_classes), dtype=np.float32)]
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.as_tensor(x[start : start + batch_size], device=model.device)
            outputs.append(model(batch).cpu().numpy().astype(np.float32))
    return np.concatenate(outputs)


def correct(logits: Tensor, y: Tensor) -> Tensor:
    """bool (B,): ``logits`` (B, K) predict the label ``y`` (B,) and are all finite."""
    return (logits.argmax(1) == y) & torch.isfinite(logits).all(1)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """float (B,): the label's logit minus the largest other one (negative: misclassified;
    -inf where ``logits`` (B, K) are not all finite, as ``correct`` never counts them)."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return torch.where(torch.isfinite(logits).all(1), true - others, float("-inf"))


def score_readouts(
    model: DefendedModel | DEQEstimator,
    x: np.ndarray,
    y: np.ndarray,
    defenses: Mapping[str, Readout],
    batch_size: int,
    *,
    margins: bool = False,
) -> Scores:
    """Per-sample correctness of each defense and of each raw iterate, from one solve per batch.

    Args:
        margins: also return each defense's ``margin`` (the racing sweep's tie-break).

    Returns:
        ``Scores`` of the B samples: ``correct`` bool (B,) per defense (``correct``: finite
        and right), ``finite`` bool (B,) per defense (its logits all finite), ``states`` bool
        (B, N) whether ``z_n`` classifies the sample correctly (n = 1..N, the solver's
        threshold), ``residuals`` float (B, N) the relative residual of ``z_n``; with
        ``margins``, ``margins`` float (B,) per defense.
    """
    model = as_defended(model)
    deq = model.deq
    threshold = deq.solver.threshold
    for readout in defenses.values():
        readout.check(threshold)
    right: dict[str, list[np.ndarray]] = {k: [] for k in defenses}
    finite: dict[str, list[np.ndarray]] = {k: [] for k in defenses}
    margin_of: dict[str, list[np.ndarray]] = {k: [] for k in defenses} if margins else {}
    states: list[np.ndarray] = []
    residuals: list[np.ndarray] = []
    was_training = deq.training
    deq.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = model_input(model, x[start : start + batch_size])
                yb = torch.as_tensor(y[start : start + batch_size], device=xb.device)
                injection = deq.inject(xb)
                trajectory = deq.solve(injection, keep=True)
                for name, readout in defenses.items():
                    logits = deq.logits(readout.state(deq, trajectory, injection), injection)
                    right[name].append(correct(logits, yb).cpu().numpy())
                    finite[name].append(torch.isfinite(logits).all(1).cpu().numpy())
                    if margins:
                        margin_of[name].append(margin(logits, yb).cpu().numpy())
                per_state = [
                    correct(deq.logits(trajectory.state(n), injection), yb)
                    for n in range(1, threshold + 1)
                ]
                states.append(torch.stack(per_state, dim=1).cpu().numpy())
                residual = [trajectory.residual(n) for n in range(1, threshold + 1)]
                residuals.append(torch.stack(residual, dim=1).cpu().numpy())
    finally:
        deq.train(was_training)
    return Scores(
        {k: np.concatenate(v) for k, v in right.items()},
        {k: np.concatenate(v) for k, v in finite.items()},
        np.concatenate(states),
        np.concatenate(residuals),
        margins={k: np.concatenate(v) for k, v in margin_of.items()},
    )


def per_state_accuracy(
    model: DefendedModel | DEQEstimator, x: np.ndarray, y: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of every raw iterate ``z_n`` as the readout and its mean relative residual,
    both (N,), with the model's preprocessing applied as in ``predict``."""
    scores = score_readouts(model, x, y, {}, batch_size)
    assert scores.residuals is not None
    return scores.per_state(), scores.residuals.mean(axis=0)
