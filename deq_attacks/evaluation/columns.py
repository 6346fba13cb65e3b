"""The columns of the evaluation table, as data: gradient estimates by label, each with the
gradient attacks of ``EvaluationConfig.attacks`` (registered: ``deq_attacks.evaluation.attacks``),
then the attacks that use no gradient. The intermediate columns come from the registered sweep
families (``deq_attacks.gradients.sweep_family``): a new family is a new estimate's columns."""

from __future__ import annotations

from collections.abc import Mapping

from deq_attacks.evaluation.attacks import Column, column_label
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.gradients import Exact, GradientEstimate, PerStepEstimate, sweep_families

READY_MADE = "ready-made"
"""Label of the training gradient's column (the attack a user of a library would run)."""
BPTT = "bptt"
"""Label of the yardstick column: backprop through the solver, the true gradient."""


def protocol_estimates(
    ready_made: GradientEstimate,
    chosen: Mapping[str, GradientEstimate],
    extra: Mapping[str, GradientEstimate] | None = None,
) -> dict[str, GradientEstimate]:
    """The gradient estimates of the columns, by label: the ready-made (training) gradient,
    Exact, the chosen candidate of each family in ``chosen`` (the sweep's choice; a family
    that did not run is absent) as ``"{family} z_{n}"``, then each family's gradient ensemble
    as ``"ens. {family}"``, in registration order, then ``extra`` (e.g.
    ``{"bptt": BackpropThroughSolver()}``)."""
    families = [family for family in sweep_families() if family.name in chosen]
    unknown = sorted(set(chosen) - {family.name for family in families})
    if unknown:
        raise ValueError(f"chosen estimates of unknown sweep families: {', '.join(unknown)}")
    estimates: dict[str, GradientEstimate] = {READY_MADE: ready_made}
    if ready_made != Exact():
        estimates["exact"] = Exact()
    picks: list[PerStepEstimate] = []
    for family in families:
        pick = chosen[family.name]
        if not isinstance(pick, family.estimate):
            raise TypeError(f"the {family.name!r} family's choice is {pick!r}")
        picks.append(pick)
        estimates[family.column(pick)] = pick
    for family, pick in zip(families, picks):
        estimates[family.ensemble_column()] = family.ensemble(pick)
    for label, estimate in (extra or {}).items():
        if label in estimates:
            raise ValueError(f"extra estimate label {label!r} is taken")
        estimates[label] = estimate
    return estimates


def protocol_columns(
    estimates: Mapping[str, GradientEstimate], config: EvaluationConfig
) -> list[Column]:
    """The columns of ``config.attacks`` (registered attacks, ``deq_attacks.evaluation.attacks``)
    in that order: a gradient attack once per estimate (``"<estimate> <label>"``, estimates in
    order), an attack that uses no gradient once (its label)."""
    columns = []
    attacks = config.attack_specs
    for label, estimate in estimates.items():
        for attack in attacks:
            if attack.uses_estimate:
                columns.append(Column(column_label(type(attack), label), attack, estimate))
    for attack in attacks:
        if not attack.uses_estimate:
            columns.append(Column(column_label(type(attack), None), attack))
    return columns
