"""The settings of the evaluation protocol, as one frozen dataclass (the command line is
derived from its fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deq_attacks.evaluation.attacks import ThreatModel
from deq_attacks.evaluation.autoattack import AutoAttackSettings
from deq_attacks.evaluation.sweep import SweepConfig


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of the protocol (defaults: the paper's CIFAR-10 setting and the standard
    AutoAttack). ``sweep`` is the grid of intermediate attacks."""

    eps: float = field(default=8 / 255, metadata=_help("L-inf budget, inputs in [0, 1]"))
    step: float = field(default=2 / 255, metadata=_help("PGD step size"))
    steps: int = field(default=10, metadata=_help("PGD iterations"))
    autoattack: bool = field(default=True, metadata=_help("run the standard AutoAttack columns"))
    bptt: bool = field(
        default=True,
        metadata=_help("the yardstick column and alignment check: backprop through the solver"),
    )
    bptt_checkpoint: bool = field(
        default=False, metadata=_help("recompute f per solver step in the BPTT backward (memory)")
    )
    aa_iterations: int = field(default=100, metadata=_help("APGD-CE/APGD-T/FAB-T iterations"))
    aa_queries: int = field(default=5000, metadata=_help("AutoAttack's Square queries"))
    aa_target_classes: int = field(default=9, metadata=_help("APGD-T/FAB-T target classes"))
    square_queries: int = field(default=5000, metadata=_help("the Square column's queries"))
    long_steps: int = field(default=100, metadata=_help("PGD steps of the more-steps check"))
    large_eps: float = field(default=0.5, metadata=_help("eps of the large-eps check"))
    diagnostic_samples: int = field(default=32, metadata=_help("samples for costly checks"))
    batch_size: int = field(default=100, metadata=_help("attack batch = shard block size"))
    seed: int = field(default=0, metadata=_help("seed of every random start"))
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        ThreatModel(self.eps, self.step, self.steps)
        AutoAttackSettings(self.aa_iterations, self.aa_queries, self.aa_target_classes)
        for name in ("square_queries", "long_steps", "diagnostic_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < self.large_eps <= 1:
            raise ValueError(f"large_eps must be in (0, 1], got {self.large_eps}")
        if not isinstance(self.sweep, SweepConfig):
            raise TypeError(f"sweep must be a SweepConfig, got {self.sweep!r}")

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.eps, self.step, self.steps)

    @property
    def autoattack_settings(self) -> AutoAttackSettings:
        return AutoAttackSettings(self.aa_iterations, self.aa_queries, self.aa_target_classes)
