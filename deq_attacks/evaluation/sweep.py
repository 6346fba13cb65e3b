"""The sweep for the strongest intermediate attack (Sec. 5.1, Fig. 3 and 4), on the
development split, over every registered sweep family (``deq_attacks.gradients.sweep_family``:
``Adjoint(n, beta)`` over n and beta, ``Unrolled(n, k, lam)`` over n, k and lambda, and any
family registered after them). Each candidate is one shared PGD run that scores every defense
and every iterate; the paper chooses, per family, the candidate with the largest drop of the
early-state defense. The grid itself is ``settings.SweepConfig``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.aggregate import choose_strongest
from deq_attacks.evaluation.attacks import ThreatModel
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.settings import SweepConfig
from deq_attacks.evaluation.shared_runs import shared_pgd_scores
from deq_attacks.gradients import GradientEstimate, estimate_spec, sweep_family
from deq_attacks.interfaces import DEQEstimator


def run_sweep(
    estimator: DEQEstimator,
    config: SweepConfig,
    x_dev: np.ndarray,
    y_dev: np.ndarray,
    threat: ThreatModel,
    defenses: Mapping[str, Readout],
    criterion: str,
    shards: Shards,
    *,
    seed: int = 0,
    done: Mapping[str, dict[str, Any]] | None = None,
    on_entry: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, GradientEstimate], list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every candidate on the development split and choose, per family, the one under
    which the defense ``criterion`` (the early-state defense) has the lowest accuracy.

    The plan (per family: whether it runs over the model's solver, with which fixed settings,
    why) and every candidate are decided and checked before the first attack.

    Args:
        done: finished entries by estimate repr (resume); ``on_entry(entry)`` is called after
            each new one; ``progress(text)`` reports each candidate as it finishes
            ("sweep 3/12 Unrolled(n=4): early 41.0%").

    Returns:
        (family -> chosen estimate, the whole sweep: one entry per candidate with its
        family, parameters, spec, accuracy of every defense and of every iterate z_n, the
        plan: one JSON record per family with its grid).
    """
    if criterion not in defenses:
        raise ValueError(f"criterion defense {criterion!r} is not among {sorted(defenses)}")
    solver = estimator.deq.solver
    plan = [{**p.to_json(), "grid": config.grid(p.family)} for p in config.plan(solver)]
    chosen: dict[str, GradientEstimate] = {}
    entries: list[dict[str, Any]] = []
    all_candidates = config.candidates(solver)
    total = sum(len(c) for c in all_candidates.values())
    for name, candidates in all_candidates.items():
        family = sweep_family(name)
        accuracies = []
        for estimate in candidates:
            key = repr(estimate)
            entry = (done or {}).get(key)
            resumed = " (stored)" if entry is not None else ""
            if entry is None:
                scores = shared_pgd_scores(
                    estimator, estimate, x_dev, y_dev, threat, defenses, shards, seed=seed
                )
                entry = {
                    "family": name,
                    "estimate": key,
                    "params": family.params(estimate),
                    "spec": estimate_spec(estimate),
                    "accuracy": {d: float(scores[f"defense/{d}"].mean()) for d in defenses},
                    "state_accuracy": scores["states"].mean(axis=0).tolist(),
                }
                if on_entry is not None:
                    on_entry(entry)
            entries.append(entry)
            accuracies.append(entry["accuracy"][criterion])
            if progress is not None:
                score = f"{criterion} {accuracies[-1]:.1%}{resumed}"
                progress(f"sweep {len(entries)}/{total} {key}: {score}")
        if candidates:
            chosen[name] = candidates[choose_strongest(accuracies)]
    return chosen, entries, plan
