"""Sweep families: per-step estimates that declare their own sweep for the strongest
intermediate attack (Sec. 5.1, Fig. 3 and 4).

A family names its estimate class, the swept parameters with their default grids, how a
candidate is built, the gradient-ensemble column that goes with the chosen candidate, and a
plan for a given solver, decided before any work: whether the family runs over that solver,
with which fixed settings, and why. Each family is declared and registered in its estimate's
own module (``register_sweep_family``); ``deq_attacks.evaluation.sweep`` and ``columns`` only
consume the registry, in registration order.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from deq_attacks.gradients.base import GradientEstimate, PerStepEstimate
from deq_attacks.gradients.ensemble import GradientEnsemble
from deq_attacks.gradients.registry import ESTIMATES
from deq_attacks.registry import Registry
from deq_attacks.solvers import Solver


@dataclass(frozen=True)
class SweepParameter:
    """One swept parameter of a family.

    Args:
        name: the estimate's field it sets (e.g. "beta").
        kind: int or float.
        default: the default grid: comma-separated values, or "all" for the step index.
        steps: True for the step index n: "all" means 1..threshold, and values are checked
            against the solver's threshold.
        check: raises ValueError for a value the estimate refuses (run on every value when a
            grid is read, so a bad grid fails before any work).
    """

    name: str
    kind: type
    default: str
    steps: bool = False
    check: Callable[[Any], object] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in (int, float):
            raise TypeError(f"a swept parameter is an int or a float, got {self.kind!r}")
        self.parse(self.default)

    def parse(self, text: str) -> tuple[Any, ...] | None:
        """The values of a grid text: "all" -> None (the step index only); "1,2,5" -> (1, 2, 5)."""
        if not isinstance(text, str):
            raise TypeError(f"{self.name}: a grid is a text ('all' or '1,2,5'), got {text!r}")
        if text.strip().lower() == "all":
            if not self.steps:
                raise ValueError(f"{self.name}: list values ('all' is only for the step index n)")
            return None
        try:
            values = tuple(self.kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(
                f"{self.name}: expected comma-separated {self.kind.__name__}s, got {text!r}"
            ) from None
        if not values:
            raise ValueError(f"{self.name}: no values in {text!r}")
        for value in values:
            if self.steps and value < 1:
                raise ValueError(f"{self.name}: step indices are >= 1, got {value}")
            if self.check is not None:
                try:
                    self.check(value)
                except ValueError as error:
                    raise ValueError(f"{self.name}={value!r}: {error}") from None
        return values

    def values(self, text: str, threshold: int) -> tuple[Any, ...]:
        """The grid for a solver with ``threshold`` iterates."""
        values = self.parse(text)
        if values is None:
            return tuple(range(1, threshold + 1))
        if self.steps and max(values) > threshold:
            raise ValueError(
                f"{self.name}: n={max(values)} is beyond the solver's {threshold} iterates"
            )
        return values


def step_parameter() -> SweepParameter:
    """The step index ``n`` of a per-step estimate, swept over every iterate by default."""
    return SweepParameter("n", int, "all", steps=True)


@dataclass(frozen=True)
class FamilyPlan:
    """What a family does over one solver, decided before any work.

    Attributes:
        family: the family's name.
        runs: whether its candidates run at all.
        fixed: settings given to every candidate besides the swept ones.
        reason: one sentence: why it runs this way (or not at all).
        left_out: sentences on related estimates that have no meaning over this solver.
    """

    family: str
    runs: bool
    fixed: Mapping[str, Any]
    reason: str
    left_out: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        fixed = {k: v.value if isinstance(v, enum.Enum) else v for k, v in self.fixed.items()}
        return {
            "family": self.family,
            "runs": self.runs,
            "fixed": fixed,
            "reason": self.reason,
            "left_out": list(self.left_out),
        }


@dataclass(frozen=True)
class SweepFamily:
    """A per-step estimate class and its sweep.

    Args:
        name: the registry key, the key of its grid in ``SweepConfig`` and the column label
            (``"{name} z_{n}"`` for the chosen candidate, ``"ens. {name}"`` for its ensemble).
        estimate: the per-step estimate class; every parameter names one of its fields.
        parameters: the swept parameters, in the order candidates are enumerated.
    """

    name: str
    estimate: type[PerStepEstimate]
    parameters: tuple[SweepParameter, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.estimate, type) and issubclass(self.estimate, PerStepEstimate)):
            raise TypeError(f"a sweep family sweeps a PerStepEstimate class, got {self.estimate!r}")
        fields = {f.name for f in dataclasses.fields(self.estimate)}  # type: ignore[arg-type]
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names) or not set(names) <= fields:
            raise ValueError(
                f"family {self.name!r}: parameters {names} must be distinct fields of "
                f"{self.estimate.__name__} ({sorted(fields)})"
            )

    def parameter(self, name: str) -> SweepParameter:
        """The swept parameter ``name``; an unknown one raises listing the family's."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise ValueError(
            f"sweep family {self.name!r} has no parameter {name!r}; its parameters: "
            f"{', '.join(p.name for p in self.parameters)}"
        )

    def defaults(self) -> dict[str, str]:
        """The default grid, parameter -> text."""
        return {p.name: p.default for p in self.parameters}

    def plan(self, solver: Solver) -> FamilyPlan:
        """What this family does over ``solver`` (default: runs as declared)."""
        return FamilyPlan(
            self.name, True, {}, f"{self.estimate.__name__} applies to any solver's iterates"
        )

    def candidates(
        self, grid: Mapping[str, str], threshold: int, plan: FamilyPlan
    ) -> list[PerStepEstimate]:
        """Every grid point as an estimate, the first parameter varying slowest; none if the
        plan says the family does not run."""
        if not plan.runs:
            return []
        names = [p.name for p in self.parameters]
        axes = [self.parameter(n).values(grid[n], threshold) for n in names]
        return [
            self.estimate(**dict(zip(names, point)), **plan.fixed)
            for point in itertools.product(*axes)
        ]

    def params(self, estimate: GradientEstimate) -> dict[str, Any]:
        """The swept parameters of a candidate."""
        if type(estimate) is not self.estimate:
            raise TypeError(f"not a candidate of the {self.name!r} family: {estimate!r}")
        return {p.name: getattr(estimate, p.name) for p in self.parameters}

    def column(self, chosen: PerStepEstimate) -> str:
        """The label of the chosen candidate's column."""
        return f"{self.name} z_{chosen.n}"

    def ensemble_column(self) -> str:
        """The label of the gradient-ensemble column."""
        return f"ens. {self.name}"

    def ensemble(self, chosen: PerStepEstimate) -> GradientEstimate:
        """The gradient ensemble that goes with the chosen candidate: its settings over every
        step n (Eq. 17)."""
        return GradientEnsemble(dataclasses.replace(chosen, n=None))  # type: ignore[type-var]


#: Every sweep family, by name, in registration order.
FAMILIES: Registry[SweepFamily] = Registry("sweep family")


def register_sweep_family(family: SweepFamily) -> SweepFamily:
    """Make ``family`` part of every sweep (after the families registered before it)."""
    if not isinstance(family, SweepFamily):
        raise TypeError(f"register_sweep_family takes a SweepFamily, got {family!r}")
    return FAMILIES.add(family.name, family)


def sweep_families() -> list[SweepFamily]:
    """The registered families, in registration order."""
    return list(FAMILIES.values())


def sweep_family(name: str) -> SweepFamily:
    """The family registered as ``name``; an unknown name raises listing the families."""
    return FAMILIES[name]


@contextmanager
def scoped_registry() -> Iterator[None]:
    """Registrations of estimates (``register_estimate``) and sweep families made inside are
    undone on exit: a test or an experiment adds its own estimate for a while."""
    with ESTIMATES.scoped(), FAMILIES.scoped():
        yield
