"""White-box evaluation: attack specs, the protocol of Sec. 6.2-6.3, and reports."""

from deq_attacks.evaluation.attacks import AttackKind, AttackSpec, ThreatModel
from deq_attacks.evaluation.protocol import (
    EvaluationResult,
    accuracy,
    evaluate,
    per_state_accuracy,
    select_early_exit,
)
from deq_attacks.evaluation.report import markdown_table, plot_states

__all__ = [
    "AttackKind",
    "AttackSpec",
    "EvaluationResult",
    "ThreatModel",
    "accuracy",
    "evaluate",
    "markdown_table",
    "per_state_accuracy",
    "plot_states",
    "select_early_exit",
]
