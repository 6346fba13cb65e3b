"""The benchmark cases, one module each, and the registry the runner reads.

A case is a module of this package with ``run(ctx: Context) -> list[Result | Measurement]``
(its rows: ratios measured side by side, or raw values for a grid) and ``BOUNDS`` (what bounds
its ratios, independent of the machine; rendered under the table). Adding a case is one
module and one name in ``CASES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from benchmarks.cases.common import Bounds, Context, Measurement, Result, Row

CASES: tuple[str, ...] = (
    "gradient_estimates",
    "art_pgd",
    "broyden_vs_torchdeq",
    "solver_bookkeeping",
    "defense_memory",
    "training_step",
    "through_solver",
    "pgd_at_throughput",
    "shared_runs",
    "scaling",
    "cascade",
    "verdict",
)


def case_module(name: str) -> ModuleType:
    """The module of case ``name``; an unknown name raises listing the cases."""
    if name not in CASES:
        raise ValueError(f"unknown benchmark case {name!r}; choose from {', '.join(CASES)}")
    return importlib.import_module(f"benchmarks.cases.{name}")


def case_run(name: str) -> Callable[[Context], list[Row]]:
    """The ``run`` function of case ``name``."""
    run: Callable[[Context], list[Row]] = case_module(name).run
    return run


def case_bounds(name: str) -> Bounds:
    """The ``BOUNDS`` notes of case ``name``."""
    bounds: Bounds = case_module(name).BOUNDS
    return bounds


__all__ = [
    "CASES",
    "Bounds",
    "Context",
    "Measurement",
    "Result",
    "Row",
    "case_bounds",
    "case_module",
    "case_run",
]
