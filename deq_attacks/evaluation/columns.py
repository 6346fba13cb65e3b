"""The columns of the evaluation table, as data: gradient estimates by label, each with
PGD and the standard AutoAttack, then Square. A new estimate is one more entry."""

from __future__ import annotations

from collections.abc import Mapping

from deq_attacks.evaluation.attacks import AttackKind, AttackSpec
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.gradients import Adjoint, Exact, GradientEnsemble, GradientEstimate, Unrolled

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
    Exact, the strongest intermediate Adjoint and Unrolled of the sweep, their gradient
    ensembles, then ``extra`` (e.g. ``{"bptt": BackpropThroughSolver()}``)."""
    adjoint, unrolled = chosen["adjoint"], chosen["unrolled"]
    assert isinstance(adjoint, Adjoint) and isinstance(unrolled, Unrolled)
    estimates: dict[str, GradientEstimate] = {READY_MADE: ready_made}
    if ready_made != Exact():
        estimates["exact"] = Exact()
    estimates[f"adjoint z_{adjoint.n}"] = adjoint
    estimates[f"unrolled z_{unrolled.n}"] = unrolled
    estimates["ens. adjoint"] = GradientEnsemble(Adjoint(beta=adjoint.beta))
    estimates["ens. unrolled"] = GradientEnsemble(Unrolled(k=unrolled.k, lam=unrolled.lam))
    for label, estimate in (extra or {}).items():
        if label in estimates:
            raise ValueError(f"extra estimate label {label!r} is taken")
        estimates[label] = estimate
    return estimates


def protocol_columns(
    estimates: Mapping[str, GradientEstimate], config: EvaluationConfig
) -> list[AttackSpec]:
    """Each estimate with PGD (shared run) and, if asked, the standard AutoAttack; then
    Square."""
    columns = []
    for label, estimate in estimates.items():
        columns.append(AttackSpec(f"{label} PGD", AttackKind.PGD, estimate, config.steps))
        if config.autoattack:
            columns.append(
                AttackSpec(
                    f"{label} AA",
                    AttackKind.AUTOATTACK,
                    estimate,
                    autoattack=config.autoattack_settings,
                )
            )
    columns.append(AttackSpec("square", AttackKind.SQUARE, steps=config.square_queries))
    return columns
