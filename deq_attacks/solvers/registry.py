"""Solvers by name: the registry behind ``--model.forward_solver``, rebuildable specs and
every list of choices.

A solver module registers its class once, under a short name::

    @register_solver("broyden")
    @dataclass(frozen=True, repr=False)
    class Broyden(Solver): ...

``SOLVERS`` is a ``deq_attacks.registry.Registry`` (one name rule, spec text, ``scoped()``);
the functions here are its methods under the names the package has always exported:
``parse_solver("anderson:threshold=8,memory=5")`` builds one from text (the command line),
``solver_spec(solver)`` writes its settings as plain JSON values and ``solver_from_spec``
reads them back; an unknown name or setting raises, listing what exists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from deq_attacks.registry import Registry
from deq_attacks.solvers.base import Solver

S = TypeVar("S", bound=type[Solver])

#: Every solver, by name.
SOLVERS: Registry[type[Solver]] = Registry("solver", Solver)


def register_solver(name: str) -> Callable[[S], S]:
    """Class decorator: make a ``Solver`` subclass known under ``name``."""
    return SOLVERS.register(name)


def scoped_solvers() -> AbstractContextManager[None]:
    """Solvers registered inside are unregistered on exit (tests, experiments)."""
    return SOLVERS.scoped()


def solver_names() -> list[str]:
    """The registered solver names, sorted."""
    return sorted(SOLVERS)


def solver_class(name: str) -> type[Solver]:
    """The class registered as ``name``; an unknown name raises listing the solvers."""
    return SOLVERS[name]


def solver_name(solver: Solver) -> str:
    """The registered name of ``solver``'s class (raises for an unregistered class)."""
    return SOLVERS.name_of(solver)


def make_solver(name: str, **settings: Any) -> Solver:
    """``solver_class(name)(**settings)``; an unknown setting raises listing the known ones."""
    solver: Solver = SOLVERS.make(name, **settings)
    return solver


def parse_solver(spec: str, **settings: Any) -> Solver:
    """A solver from text: ``"broyden"`` or ``"anderson:threshold=8,memory=5,stop_mode=abs"``.

    ``settings`` are further settings given apart from the text (e.g. ``threshold=`` from an
    option of its own); one that the text gives too raises.
    """
    solver: Solver = SOLVERS.create(spec, **settings)
    return solver


def solver_spec(solver: Solver) -> dict[str, Any]:
    """The name and every setting of ``solver`` as plain JSON values (enums by value)."""
    return SOLVERS.to_json(solver)


def solver_from_spec(spec: Mapping[str, Any]) -> Solver:
    """The solver that ``solver_spec`` described."""
    solver: Solver = SOLVERS.from_json(spec)
    return solver
