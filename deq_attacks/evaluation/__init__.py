"""White-box evaluation: the protocol of Sec. 6.2-6.3 (``evaluate_model``), its attack
columns, shared runs, sweep, per-sample aggregation, diagnostics and reports."""

from deq_attacks.evaluation.aggregate import (
    Robustness,
    SurvivalMatrix,
    choose_early_exit,
    choose_strongest,
    wilson_interval,
)
from deq_attacks.evaluation.attacks import AttackKind, AttackSpec, DefendedModel, ThreatModel
from deq_attacks.evaluation.autoattack import AutoAttackSettings, run_standard_autoattack
from deq_attacks.evaluation.columns import protocol_columns, protocol_estimates
from deq_attacks.evaluation.pgd import fixed_step_pgd
from deq_attacks.evaluation.protocol import evaluate_model
from deq_attacks.evaluation.report import markdown_report, markdown_table, write_outputs
from deq_attacks.evaluation.result import EvaluationReport
from deq_attacks.evaluation.scoring import per_state_accuracy, score_readouts
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.evaluation.sweep import SweepConfig, run_sweep

__all__ = [
    "AttackKind",
    "AttackSpec",
    "AutoAttackSettings",
    "DefendedModel",
    "EvaluationConfig",
    "EvaluationReport",
    "Robustness",
    "SurvivalMatrix",
    "SweepConfig",
    "ThreatModel",
    "choose_early_exit",
    "choose_strongest",
    "evaluate_model",
    "fixed_step_pgd",
    "markdown_report",
    "markdown_table",
    "per_state_accuracy",
    "protocol_columns",
    "protocol_estimates",
    "run_standard_autoattack",
    "run_sweep",
    "score_readouts",
    "wilson_interval",
    "write_outputs",
]
