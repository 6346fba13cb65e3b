"""White-box evaluation: the protocol of Sec. 6.2-6.3 (``evaluate_model``, table or cascade
mode), its attack columns (registered by name: ``deq_attacks.evaluation.attacks``), shared runs,
sweep, per-sample aggregation, measurements and diagnostics, reports (and ``write_tables`` for
tables of one's own), the images training does not use (``held_out_data``), gradient alignment,
and a RobustBench-style entry point (``benchmark``). The names are imported on first use
(``deq_attacks.lazy``)."""

from typing import TYPE_CHECKING

from deq_attacks.lazy import lazy_exports

if TYPE_CHECKING:
    from deq_attacks.evaluation.aggregate import (
        Robustness,
        SurvivalMatrix,
        choose_early_exit,
        choose_strongest,
        clopper_pearson_upper,
        wilson_interval,
    )
    from deq_attacks.evaluation.alignment import AlignmentResult, gradient_alignment
    from deq_attacks.evaluation.attacks import (
        Attack,
        AttackOutput,
        Column,
        DefendedModel,
        SampleSeeds,
        attack_names,
        fixed_step_pgd,
        register_attack,
        run_standard_autoattack,
        scoped_attacks,
    )
    from deq_attacks.evaluation.benchmark import BenchmarkResult, benchmark
    from deq_attacks.evaluation.cells import column_scores
    from deq_attacks.evaluation.columns import (
        BPTT,
        READY_MADE,
        protocol_columns,
        protocol_estimates,
    )
    from deq_attacks.evaluation.protocol import evaluate_model
    from deq_attacks.evaluation.report import (
        markdown_report,
        markdown_rows,
        markdown_table,
        write_outputs,
        write_tables,
    )
    from deq_attacks.evaluation.result import EvaluationReport, RunRecord
    from deq_attacks.evaluation.scores import Development, Scores, SweepResult
    from deq_attacks.evaluation.scoring import per_state_accuracy, score_readouts
    from deq_attacks.evaluation.settings import EvaluationConfig, Mode, SweepConfig, SweepMode
    from deq_attacks.evaluation.sweep import run_sweep
    from deq_attacks.evaluation.threat import AutoAttackSettings, ThreatModel
    from deq_attacks.splits import held_out_data

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "deq_attacks.evaluation.aggregate": (
            "Robustness",
            "SurvivalMatrix",
            "choose_early_exit",
            "choose_strongest",
            "clopper_pearson_upper",
            "wilson_interval",
        ),
        "deq_attacks.evaluation.attacks": (
            "Attack",
            "AttackOutput",
            "Column",
            "DefendedModel",
            "SampleSeeds",
            "attack_names",
            "fixed_step_pgd",
            "register_attack",
            "run_standard_autoattack",
            "scoped_attacks",
        ),
        "deq_attacks.evaluation.alignment": ("AlignmentResult", "gradient_alignment"),
        "deq_attacks.evaluation.benchmark": ("BenchmarkResult", "benchmark"),
        "deq_attacks.evaluation.cells": ("column_scores",),
        "deq_attacks.evaluation.columns": (
            "BPTT",
            "READY_MADE",
            "protocol_columns",
            "protocol_estimates",
        ),
        "deq_attacks.evaluation.protocol": ("evaluate_model",),
        "deq_attacks.evaluation.report": (
            "markdown_report",
            "markdown_rows",
            "markdown_table",
            "write_outputs",
            "write_tables",
        ),
        "deq_attacks.evaluation.result": ("EvaluationReport", "RunRecord"),
        "deq_attacks.evaluation.scores": ("Development", "Scores", "SweepResult"),
        "deq_attacks.evaluation.scoring": ("per_state_accuracy", "score_readouts"),
        "deq_attacks.evaluation.settings": ("EvaluationConfig", "Mode", "SweepConfig", "SweepMode"),
        "deq_attacks.splits": ("held_out_data",),
        "deq_attacks.evaluation.sweep": ("run_sweep",),
        "deq_attacks.evaluation.threat": ("AutoAttackSettings", "ThreatModel"),
    },
)

__all__ = [
    "BPTT",
    "READY_MADE",
    "AlignmentResult",
    "Attack",
    "AttackOutput",
    "AutoAttackSettings",
    "BenchmarkResult",
    "Column",
    "DefendedModel",
    "Development",
    "EvaluationConfig",
    "EvaluationReport",
    "Mode",
    "Robustness",
    "RunRecord",
    "SampleSeeds",
    "Scores",
    "SurvivalMatrix",
    "SweepConfig",
    "SweepMode",
    "SweepResult",
    "ThreatModel",
    "attack_names",
    "benchmark",
    "choose_early_exit",
    "choose_strongest",
    "clopper_pearson_upper",
    "column_scores",
    "evaluate_model",
    "fixed_step_pgd",
    "gradient_alignment",
    "held_out_data",
    "markdown_report",
    "markdown_rows",
    "markdown_table",
    "per_state_accuracy",
    "protocol_columns",
    "protocol_estimates",
    "register_attack",
    "run_standard_autoattack",
    "run_sweep",
    "scoped_attacks",
    "score_readouts",
    "wilson_interval",
    "write_outputs",
    "write_tables",
]
