"""The settings of the evaluation protocol, as one frozen dataclass (the command line is
derived from its fields)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from deq_attacks.evaluation.attacks import (
    PRECISIONS,
    AutoAttackSettings,
    ThreatModel,
    attack_class,
    attack_names,
    parse_attacks,
)
from deq_attacks.evaluation.sweep import SweepConfig

#: Attack batch (= shard block) when ``batch_size`` is None, by device type.
DEFAULT_BATCH = {"cpu": 100, "cuda": 500}


class Mode(enum.Enum):
    """How the columns run: ``table`` attacks every sample with every column (the paper's
    table, both aggregations); ``cascade`` runs, per defense, the columns strongest first and
    attacks only the samples still robust (the per-sample verdict only, at a fraction of the
    cost)."""

    TABLE = "table"
    CASCADE = "cascade"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of the protocol (defaults: the paper's CIFAR-10 setting and the standard
    AutoAttack). ``sweep`` is the grid of intermediate attacks."""

    eps: float = field(default=8 / 255, metadata=_help("L-inf budget, inputs in [0, 1]"))
    step: float = field(default=2 / 255, metadata=_help("PGD step size"))
    steps: int = field(default=10, metadata=_help("PGD iterations"))
    attacks: str = field(
        default="pgd,autoattack,square",
        metadata=_help(
            "attack columns, comma-separated registered names, in column order (one column "
            "per gradient estimate for a gradient attack); registered: " + ", ".join(attack_names())
        ),
    )
    mode: Mode = field(
        default=Mode.TABLE,
        metadata=_help("table: every column on every sample; cascade: per-sample verdict only"),
    )
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
    batch_size: int | None = field(
        default=None,
        metadata=_help("attack batch = shard block size (none: 100 on CPU, 500 on CUDA)"),
    )
    precision: str = field(
        default="fp32",
        metadata=_help("attack arithmetic: fp32, or bf16 autocast (the ready-made PGD is then "
                       "also run in fp32 on the same images and both are reported)"),
    )  # fmt: skip
    compile_backend: str = field(
        default="",
        metadata=_help("torch.compile backend for the fixed-step PGD's step and f (e.g. "
                       "inductor on a GPU; empty: no compilation)"),
    )  # fmt: skip
    seed: int = field(default=0, metadata=_help("seed of every random draw (>= 0)"))
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        ThreatModel(self.eps, self.step, self.steps)
        AutoAttackSettings(self.aa_iterations, self.aa_queries, self.aa_target_classes)
        names = parse_attacks(self.attacks)
        if "pgd" not in names:
            raise ValueError(
                "the protocol needs the fixed-step PGD ('pgd') among its attacks: the "
                "per-iterate curves and the robustness-accumulation and more-steps checks read "
                f"its ready-made run (attacks: {self.attacks!r})"
            )
        if not isinstance(self.mode, Mode):
            raise TypeError(f"mode must be a Mode (table or cascade), got {self.mode!r}")
        for name in ("square_queries", "long_steps", "diagnostic_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {self.batch_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not 0 < self.large_eps <= 1:
            raise ValueError(f"large_eps must be in (0, 1], got {self.large_eps}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        refusing = [n for n in names if self.precision not in attack_class(n).precisions]
        if refusing:
            raise ValueError(f"attacks {', '.join(refusing)} cannot run in {self.precision}")
        if not isinstance(self.compile_backend, str):
            raise TypeError(f"compile_backend must be a text, got {self.compile_backend!r}")
        if self.compile_backend:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in known:
                raise ValueError(
                    f"unknown torch.compile backend {self.compile_backend!r}; "
                    f"choose from {', '.join(known)}"
                )
        if not isinstance(self.sweep, SweepConfig):
            raise TypeError(f"sweep must be a SweepConfig, got {self.sweep!r}")

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.eps, self.step, self.steps)

    @property
    def autoattack_settings(self) -> AutoAttackSettings:
        return AutoAttackSettings(self.aa_iterations, self.aa_queries, self.aa_target_classes)

    @property
    def attack_list(self) -> tuple[str, ...]:
        """The attack names of ``attacks``, in column order."""
        return parse_attacks(self.attacks)

    def attack_batch(self, device: torch.device) -> int:
        """The attack batch on ``device``: ``batch_size``, or the device type's default."""
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_BATCH.get(device.type, DEFAULT_BATCH["cpu"])
