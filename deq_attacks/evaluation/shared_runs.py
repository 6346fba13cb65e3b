"""One shared attack run per gradient estimate: the fixed-step PGD's adversarial examples
scored against every defense and every iterate ``z_n`` (the estimate does not depend on the
readout, and the attack never looks at the defended output)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.attacks import SampleSeeds, ThreatModel, fixed_step_pgd
from deq_attacks.evaluation.distributed import Shards, map_blocks
from deq_attacks.evaluation.scores import Scores
from deq_attacks.evaluation.scoring import score_readouts
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces import DEQEstimator


def shared_pgd_scores(
    model: DefendedModel | DEQEstimator,
    estimate: GradientEstimate,
    x: np.ndarray,
    y: np.ndarray,
    threat: ThreatModel,
    defenses: Mapping[str, Readout],
    shards: Shards,
    *,
    seed: int = 0,
    indices: np.ndarray | None = None,
    margins: bool = False,
) -> Scores:
    """Run the threat model's fixed-step PGD (its eps, step and steps) with ``estimate`` once
    per block, from the per-sample random starts of ``seed``, and score its adversarial
    examples against ``defenses`` and every iterate, on ``model`` (an ART estimator is read by
    ``DefendedModel.of``).

    Args:
        indices: the samples of ``x`` to attack (default all); a sample's result does not
            depend on which others are attacked with it (its seeds follow its index).
        margins: also score each defense's ``margins`` (``score_readouts``).

    Returns the samples' ``score_readouts``, gathered across processes.
    """

    defended = as_defended(model)
    attacked = defended.view(estimate) if estimate != defended.estimate else defended  # once

    def block(part: np.ndarray) -> dict[str, np.ndarray]:
        seeds = SampleSeeds(seed, "pgd", part)
        x_adv = fixed_step_pgd(attacked, estimate, x[part], y[part], threat, seed=seeds)
        scores = score_readouts(defended, x_adv, y[part], defenses, len(x_adv), margins=margins)
        return scores.arrays()

    return Scores.from_arrays(map_blocks(block, len(x) if indices is None else indices, shards))


def clean_scores(
    model: DefendedModel | DEQEstimator,
    x: np.ndarray,
    y: np.ndarray,
    defenses: Mapping[str, Readout],
    shards: Shards,
) -> Scores:
    """``score_readouts`` of the clean inputs, gathered across processes."""
    defended = as_defended(model)
    found = map_blocks(
        lambda part: score_readouts(
            defended, x[part], y[part], defenses, shards.block_size
        ).arrays(),
        len(x),
        shards,
    )
    return Scores.from_arrays(found)
