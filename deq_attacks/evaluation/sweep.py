"""The sweep for the strongest intermediate attack (Sec. 5.1, Fig. 3 and 4), on the
development split, over every registered sweep family (``deq_attacks.gradients.sweep_family``:
``Adjoint(n, beta)`` over n and beta, ``Unrolled(n, k, lam)`` over n, k and lambda, and any
family registered after them). Each candidate is one shared PGD run that scores every defense
and every iterate; the paper chooses, per family, the candidate with the largest drop of the
early-state defense. The grid itself is ``settings.SweepConfig``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from deq_attacks.adversarial import DefendedModel
from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.aggregate import choose_strongest
from deq_attacks.evaluation.attacks import ThreatModel
from deq_attacks.evaluation.cost import racing_rounds
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.scores import Scores, SweepResult
from deq_attacks.evaluation.settings import SweepConfig, SweepMode
from deq_attacks.evaluation.shared_runs import shared_pgd_scores
from deq_attacks.gradients import (
    GradientEstimate,
    PerStepEstimate,
    SweepFamily,
    estimate_spec,
    sweep_family,
)
from deq_attacks.interfaces import DEQEstimator


def run_sweep(
    model: DefendedModel | DEQEstimator,
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
    mode: SweepMode = SweepMode.GRID,
) -> SweepResult:
    """Score every candidate on the development split and choose, per family, the one under
    which the defense ``criterion`` (the early-state defense) has the lowest accuracy.

    The plan (per family: whether it runs over the model's solver, with which fixed settings,
    why) and every candidate are decided and checked before the first attack.

    Args:
        done: finished entries by estimate repr (resume; a race resumes once its family's
            race finished); ``on_entry(entry)`` is called after each new one;
            ``progress(text)`` reports each candidate as it finishes
            ("sweep 3/12 Unrolled(n=4): early 41.0%").
        mode: GRID scores every candidate on the whole split; RACING races each family's
            candidates (``race``): its entries hold the images each saw and the race.

    Returns:
        ``SweepResult``: family -> chosen estimate, the whole sweep (one entry per candidate
        with its family, parameters, spec, accuracy of every defense and of every iterate
        z_n) and the plan (one JSON record per family with its grid).
    """
    if criterion not in defenses:
        raise ValueError(f"criterion defense {criterion!r} is not among {sorted(defenses)}")
    solver = model.deq.solver
    plan = [{**p.to_json(), "grid": config.grid(p.family)} for p in config.plan(solver)]
    chosen: dict[str, GradientEstimate] = {}
    entries: list[dict[str, Any]] = []
    all_candidates = config.candidates(solver)
    total = sum(len(c) for c in all_candidates.values())

    def score(estimate: PerStepEstimate, indices: np.ndarray) -> Scores:
        return shared_pgd_scores(
            model, estimate, x_dev, y_dev, threat, defenses, shards, seed=seed,
            indices=indices, margins=mode is SweepMode.RACING,
        )  # fmt: skip

    for name, candidates in all_candidates.items():
        family = sweep_family(name)

        def entry_of(
            estimate: PerStepEstimate,
            scores: Scores,
            name: str = name,
            family: SweepFamily = family,
        ) -> dict[str, Any]:
            return {
                "family": name,
                "estimate": repr(estimate),
                "params": family.params(estimate),
                "spec": estimate_spec(estimate),
                "accuracy": {d: scores.accuracy(d) for d in defenses},
                "state_accuracy": scores.per_state().tolist(),
                "images": scores.samples,
            }

        def report(entry: dict[str, Any], resumed: str = "") -> None:
            entries.append(entry)
            if progress is not None:
                accuracy = f"{criterion} {entry['accuracy'][criterion]:.1%}"
                seen = f" on {entry['images']} images" if "race" in entry else ""
                progress(f"sweep {len(entries)}/{total} {entry['estimate']}: {accuracy}{seen}"
                         f"{resumed}")  # fmt: skip

        if mode is SweepMode.RACING and candidates:
            stored = [(done or {}).get(repr(c)) for c in candidates]
            if any(e is not None and e.get("chosen") for e in stored):  # a finished race
                finished = [e for e in stored if e is not None]
                for old in finished:
                    report(old, " (stored)")
                pick = next(i for i, e in enumerate(stored) if e is not None and e["chosen"])
                chosen[name] = candidates[pick]
                continue
            raced, pick = race(candidates, len(x_dev), criterion, score, entry_of)
            for new in raced:
                if on_entry is not None:
                    on_entry(new)
                report(new)
            chosen[name] = candidates[pick]
            continue
        accuracies = []
        for estimate in candidates:
            key = repr(estimate)
            entry = (done or {}).get(key)
            resumed = " (stored)" if entry is not None else ""
            if entry is None:
                entry = entry_of(estimate, score(estimate, np.arange(len(x_dev))))
                if on_entry is not None:
                    on_entry(entry)
            accuracies.append(entry["accuracy"][criterion])
            report(entry, resumed)
        if candidates:
            chosen[name] = candidates[choose_strongest(accuracies)]
    return SweepResult(chosen, entries, plan)


def race(
    candidates: Sequence[PerStepEstimate],
    n: int,
    criterion: str,
    score: Callable[[PerStepEstimate, np.ndarray], Scores],
    entry_of: Callable[[PerStepEstimate, Scores], dict[str, Any]],
) -> tuple[list[dict[str, Any]], int]:
    """Successive halving over ``candidates`` on growing prefixes of the ``n`` development
    images (``cost.racing_rounds``): each round every candidate still racing attacks the
    images new to it (a sample's result does not depend on the others: per-sample seeds), and
    the stronger half goes on: ranked by the accuracy of ``criterion`` (lowest first), ties
    broken by the margins of ``criterion``'s logits (``margin_rank_sums``: lowest first), then
    by grid order. The last round sees all ``n``; of its candidates the first of the lowest
    accuracy is chosen (the grid's rule). The race stops as soon as a candidate leaves no
    ``criterion`` sample robust on the images it saw (nothing can be stronger).
    ``score(estimate, indices)`` must return the margins of ``criterion``.

    Returns the entries of the candidates that ran (``entry_of`` with ``"race"``: per round
    the images seen, the accuracy, the margin rank sum and whether it went on; ``"chosen"``)
    and the index of the chosen one."""
    scores: dict[int, Scores] = {}
    history: dict[int, list[dict[str, Any]]] = {}
    alive = list(range(len(candidates)))
    pick = None
    for number, (_, seen) in enumerate(racing_rounds(len(candidates), n)):
        accuracy = {}
        for i in alive:
            before = scores[i].samples if i in scores else 0
            new = score(candidates[i], np.arange(before, seen))
            scores[i] = scores[i].extended(new) if i in scores else new
            accuracy[i] = scores[i].accuracy(criterion)
            history.setdefault(i, []).append(
                {"round": number, "images": seen, "accuracy": accuracy[i]}
            )
            if accuracy[i] == 0.0:  # the floor: no candidate can do better
                pick = i
                break
        if pick is not None:
            break
        if seen < n:  # the stronger half goes on
            ranks = margin_rank_sums([scores[i].margins[criterion] for i in alive])
            rank = dict(zip(alive, ranks.tolist()))
            ordered = sorted(alive, key=lambda i: (accuracy[i], rank[i], i))
            goes_on = set(ordered[: max(1, math.ceil(len(alive) / 2))])
            for i in alive:
                history[i][-1].update(margin_rank_sum=rank[i], goes_on=i in goes_on)
            alive = [i for i in alive if i in goes_on]
    if pick is None:
        final = [scores[i].accuracy(criterion) for i in alive]
        pick = alive[choose_strongest(final)]
    entries = []
    for i in sorted(scores):
        entry = entry_of(candidates[i], scores[i])
        entries.append({**entry, "race": history[i], "chosen": i == pick})
    return entries, pick


def margin_rank_sums(margins: Sequence[np.ndarray]) -> np.ndarray:
    """float (C,): per candidate, the sum over images of its rank among the C candidates by
    the margin of the attacked logits on that image (``scoring.margin``, each (S,) over the
    same S images; rank 1: lowest margin, the strongest attack; ties share their mean rank).
    Ranks, not the margins themselves, so that one image with a huge margin (or -inf, where
    the logits are not finite) weighs like any other."""
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in margins])
    return np.asarray(rankdata(stacked, axis=0).sum(axis=1), dtype=np.float64)
