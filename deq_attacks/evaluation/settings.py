"""The settings of the evaluation protocol, as frozen dataclasses: ``EvaluationConfig`` and its
sweep grid ``SweepConfig``. The command line derives its options from the fields (the
docstring under each field is its help), so this module imports no torch: the registries that
validation consults (attacks, sweep families, torch.compile backends) are imported inside the
validating functions. The attacks are their spec text (``attacks``): each attack's budget is
its own (``deq_attacks.evaluation.attacks``); the settings here are the threat model and what
every column shares.

No ``from __future__ import annotations`` here: jsonargparse then reads the fields' types as
objects and never runs the ``TYPE_CHECKING`` imports (torch) to resolve them."""

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from deq_attacks.evaluation.threat import ThreatModel, check_budget

if TYPE_CHECKING:
    import torch

    from deq_attacks.deq.entropy import InputEntropyReduction
    from deq_attacks.evaluation.attacks import Attack
    from deq_attacks.gradients import FamilyPlan, PerStepEstimate
    from deq_attacks.solvers import Solver

#: The entropy defense's settings: ``InputEntropyReduction``'s fields, ``entropy_<name>`` in
#: ``EvaluationConfig``.
ENTROPY_FIELDS = ("steps", "step", "eps", "every")

#: Attack batch (= shard block) when ``batch_size`` is None, by device type.
DEFAULT_BATCH = {"cpu": 100, "cuda": 500}


class Mode(enum.Enum):
    """How the columns run: ``table`` attacks every sample with every column (the paper's
    table, both aggregations); ``cascade`` runs, per defense, the columns strongest first and
    attacks only the samples still robust (the per-sample verdict only, at a fraction of the
    cost); ``verdict`` is the cascade cut to the columns the development split shows are
    needed, with an audit of the rest on a random subsample of the survivors (the per-sample
    verdict with a bound on what the skipped columns would have broken)."""

    TABLE = "table"
    CASCADE = "cascade"
    VERDICT = "verdict"


class SweepMode(enum.Enum):
    """How the sweep scores its candidates: ``grid`` runs every candidate on the whole
    development split; ``racing`` runs successive halving on growing parts of it and stops a
    family as soon as a candidate leaves no early-defense sample robust."""

    GRID = "grid"
    RACING = "racing"


@dataclass(frozen=True)
class SweepConfig:
    """Overrides of the families' default grids: family -> parameter -> "all" (the step
    index: 1..N) or comma-separated values, e.g. ``{"unrolled": {"k": "1,5", "lam": "1.0"}}``.
    A family or parameter left out keeps its default (``SweepFamily.defaults()``). Validated at
    construction against the registered families and their declared parameters.
    """

    grids: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Per-family grid overrides, e.g. {'unrolled': {'k': '1,5'}}."""

    def __post_init__(self) -> None:
        if not isinstance(self.grids, Mapping):
            raise TypeError(f"grids must map a family to its grid, got {self.grids!r}")
        grids: dict[str, dict[str, str]] = {}
        if self.grids:
            from deq_attacks.gradients import sweep_family

            for name, grid in self.grids.items():
                family = sweep_family(name)
                if not isinstance(grid, Mapping):
                    raise TypeError(f"grid of {name!r} must map parameter -> values, got {grid!r}")
                for param, text in grid.items():
                    parameter = family.parameter(param)
                    try:
                        parameter.parse(text)
                    except (ValueError, TypeError) as error:
                        raise type(error)(f"sweep {name}.{error}") from None
                grids[name] = dict(grid)
        object.__setattr__(self, "grids", grids)

    def __hash__(self) -> int:
        return hash(tuple((f, tuple(sorted(g.items()))) for f, g in sorted(self.grids.items())))

    @classmethod
    def from_items(cls, items: Iterable[str]) -> "SweepConfig":
        """From command-line items ``FAMILY.PARAM=VALUES`` (``unrolled.k=1,5``)."""
        grids: dict[str, dict[str, str]] = {}
        for item in items:
            key, sep, values = item.partition("=")
            family, dot, param = key.strip().partition(".")
            if not sep or not dot or not family or not param:
                raise ValueError(f"--sweep expects FAMILY.PARAM=VALUES, got {item!r}")
            grids.setdefault(family, {})[param] = values.strip()
        return cls(grids)

    def updated(self, grids: Mapping[str, Mapping[str, str]]) -> "SweepConfig":
        """This config with the given family grids overriding its own, parameter by parameter."""
        merged = {name: dict(grid) for name, grid in self.grids.items()}
        for name, grid in grids.items():
            merged.setdefault(name, {}).update(grid)
        return SweepConfig(merged)

    def grid(self, family: str) -> dict[str, str]:
        """The grid of ``family``: its defaults with this config's overrides."""
        from deq_attacks.gradients import sweep_family

        return {**sweep_family(family).defaults(), **self.grids.get(family, {})}

    def plan(self, solver: "Solver") -> "list[FamilyPlan]":
        """What every registered family does over ``solver`` (decided before any work)."""
        from deq_attacks.gradients import sweep_families, sweep_family

        for name in self.grids:
            sweep_family(name)  # a family unregistered since construction fails here
        return [family.plan(solver) for family in sweep_families()]

    def candidates(self, solver: "Solver") -> "dict[str, list[PerStepEstimate]]":
        """The candidates of each family that runs over ``solver``, in registration order."""
        from deq_attacks.gradients import sweep_family

        chosen = {}
        for plan in self.plan(solver):
            if plan.runs:
                family = sweep_family(plan.family)
                grid = self.grid(plan.family)
                candidates = family.candidates(grid, solver.threshold, plan)
                for estimate in candidates:
                    estimate.check(solver)
                chosen[plan.family] = candidates
        return chosen


@dataclass(frozen=True)
class EvaluationConfig:
    """The protocol's settings (defaults: the paper's CIFAR-10 setting, standard AutoAttack).

    ``sweep`` is the grid of intermediate attacks (``--sweep`` on the command line)."""

    eps: float = 8 / 255
    """Budget in `norm`, inputs in [0, 1]."""
    step: float = 2 / 255
    """PGD step size (its length in `norm`)."""
    steps: int = 10
    """PGD iterations."""
    attacks: str = "pgd,autoattack,square"
    """Attack columns in column order, comma-separated specs NAME[:KEY=VALUE,...] each with
    its own budget, e.g. 'pgd,autoattack:iterations=100,queries=5000,square:queries=5000'
    (one column per gradient estimate for a gradient attack; `deq-attacks list attacks`
    names them and their settings)."""
    mode: Mode = Mode.VERDICT
    """TABLE: every column on every sample; CASCADE: per-sample verdict only, columns
    strongest first on the samples still robust; VERDICT: the cascade cut to the columns the
    development split needs, the others audited on a random subsample of the survivors."""
    audit_size: int = 59
    """Verdict mode: test survivors per defense that face every skipped column (59: zero
    extra breaks bound the missed fraction at 5%, one-sided 95% Clopper-Pearson)."""
    cover_size: int | None = 0
    """Verdict mode: development images the cover attacks with every column, to keep the
    columns that break what the strongest column misses (a seeded random subset; None: the
    whole development split; 0: no cover, the ready-made PGD and the strongest column alone
    are kept and the audit decides what else runs)."""
    sweep_mode: SweepMode = SweepMode.RACING
    """RACING: successive halving of the sweep's candidates on growing parts of the
    development split, stopping at 0% robust; GRID: every candidate on the whole split."""
    bptt: bool = True
    """The yardstick column and alignment check: backprop through the solver."""
    bptt_checkpoint: bool = False
    """Recompute f per solver step in the BPTT backward (memory)."""
    eot_draws: int = 1
    """Expectation over transformation: every gradient column averages its gradient over this
    many draws per step (1: one draw, the plain gradient)."""
    randomized_eot_draws: int = 20
    """The draws every gradient column uses when eot_draws is 1 and two identical forwards of
    the model differ (a randomized output; AutoAttack's rand version uses 20); 1: never switch
    EOT on."""
    long_steps: int = 100
    """PGD steps of the more-steps check (more than steps)."""
    large_eps: float = 0.5
    """Eps of the large-eps check."""
    diagnostic_samples: int = 32
    """Samples for costly checks."""
    batch_size: int | None = None
    """Attack batch = shard block size (null: 100 on CPU, 500 on CUDA)."""
    precision: str = "fp32"
    """Attack arithmetic: fp32, or bf16 autocast (the ready-made PGD is then also run in fp32
    on the same images and both are reported)."""
    compile_backend: str = ""
    """torch.compile backend for the fixed-step PGD's step and f (e.g. inductor on a GPU;
    empty: no compilation)."""
    seed: int = 0
    """Seed of every random draw (>= 0)."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The grid of intermediate attacks (on the command line: --sweep FAMILY.PARAM=VALUES)."""
    norm: str = "Linf"
    """Threat model: Linf or L2 (RobustBench's names); every attack column runs under it."""
    entropy_defense: bool = False
    """Also evaluate the follow-up's input-entropy-reduction defense (Yang et al. 2023) on the
    test split, as its authors did (PGD crafted with the defense off: not adaptive) and
    adaptively (the exact gradient through it, BPDA; AutoAttack when among the attacks);
    reported beside the readouts, not in the white-box robustness (docs/defenses.md)."""
    entropy_steps: int = 10
    """The entropy defense: signed-gradient steps on the input per round (paper 10)."""
    entropy_step: float = 2 / 255
    """The entropy defense: size of each input step (paper 2/255)."""
    entropy_eps: float = 8 / 255
    """The entropy defense: L-inf radius its input updates stay in (paper 8/255)."""
    entropy_every: int = 2
    """The entropy defense: solver steps per round (paper 2; at most the solver's threshold)."""

    def __post_init__(self) -> None:
        from deq_attacks.evaluation.attacks import PRECISIONS, attack_text, parse_attacks

        ThreatModel(self.eps, self.step, self.steps, norm=self.norm)
        attacks = parse_attacks(self.attacks)
        names = [attack.name for attack in attacks]
        # one text per set of attacks: canonical names, settings at their default left out
        object.__setattr__(self, "attacks", ",".join(attack_text(a) for a in attacks))
        if "pgd" not in names:
            raise ValueError(
                "the protocol needs the fixed-step PGD ('pgd') among its attacks: the "
                "per-iterate curves and the robustness-accumulation and more-steps checks read "
                f"its ready-made run (attacks: {self.attacks!r})"
            )
        if not isinstance(self.mode, Mode):
            raise TypeError(f"mode must be a Mode (table, cascade or verdict), got {self.mode!r}")
        if not isinstance(self.sweep_mode, SweepMode):
            raise TypeError(
                f"sweep_mode must be a SweepMode (racing or grid), got {self.sweep_mode!r}"
            )
        counts = ("long_steps", "diagnostic_samples", "eot_draws",
                  "randomized_eot_draws", "audit_size")  # fmt: skip
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.cover_size is not None and (
            isinstance(self.cover_size, bool)
            or not isinstance(self.cover_size, int)
            or self.cover_size < 0
        ):
            raise ValueError(f"cover_size must be an int >= 0 or None, got {self.cover_size!r}")
        if self.long_steps <= self.steps:
            raise ValueError(
                f"long_steps ({self.long_steps}) must be more than steps ({self.steps}): the "
                "more-steps check compares PGD with more steps against PGD-steps (give "
                "--long_steps above --steps)"
            )
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {self.batch_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        check_budget("large_eps", self.large_eps, self.norm)
        if self.norm == "L2" and not self.large_eps > self.eps:
            raise ValueError(
                f"large_eps ({self.large_eps}) must exceed eps ({self.eps}) under L2: the "
                "large-eps check needs a larger ball (the cifar10_l2 preset uses 8.0)"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        refusing = [a.name for a in attacks if self.precision not in a.precisions]
        if refusing:
            raise ValueError(f"attacks {', '.join(refusing)} cannot run in {self.precision}")
        if not isinstance(self.compile_backend, str):
            raise TypeError(f"compile_backend must be a text, got {self.compile_backend!r}")
        if self.compile_backend:
            from deq_attacks.acceleration import check_compile_backend

            check_compile_backend(self.compile_backend)
        if not isinstance(self.sweep, SweepConfig):
            raise TypeError(f"sweep must be a SweepConfig, got {self.sweep!r}")
        self._check_entropy_defense()

    def _check_entropy_defense(self) -> None:
        """The entropy defense's settings are valid, and given only with the defense on."""
        from deq_attacks.deq.entropy import InputEntropyReduction

        if not isinstance(self.entropy_defense, bool):
            raise TypeError(f"entropy_defense must be true or false, got {self.entropy_defense!r}")
        values = {name: getattr(self, f"entropy_{name}") for name in ENTROPY_FIELDS}
        try:
            InputEntropyReduction(**values)
        except ValueError as error:
            raise ValueError(f"entropy_{error}") from None
        if not self.entropy_defense:
            defaults = {f.name: f.default for f in fields(self)}
            given = [f"entropy_{n}" for n, v in values.items() if v != defaults[f"entropy_{n}"]]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set but entropy_defense is off (give --entropy_defense "
                    "true to evaluate the defense)"
                )

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.eps, self.step, self.steps, norm=self.norm)

    @property
    def entropy_settings(self) -> "InputEntropyReduction | None":
        """The entropy defense's settings, None when it is off."""
        if not self.entropy_defense:
            return None
        from deq_attacks.deq.entropy import InputEntropyReduction

        return InputEntropyReduction(
            **{name: getattr(self, f"entropy_{name}") for name in ENTROPY_FIELDS}
        )

    @property
    def attack_specs(self) -> "tuple[Attack, ...]":
        """The attacks of ``attacks``, in column order, each with its own budget and the
        shared settings it takes (``eot_draws``, ``compile_backend``)."""
        from deq_attacks.evaluation.attacks import parse_attacks

        shared = {"eot_draws": self.eot_draws, "compile_backend": self.compile_backend}
        return tuple(attack.with_shared(**shared) for attack in parse_attacks(self.attacks))

    def attack_batch(self, device: "torch.device") -> int:
        """The attack batch on ``device``: ``batch_size``, or the device type's default."""
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_BATCH.get(device.type, DEFAULT_BATCH["cpu"])
