"""Solvers by name: the registry behind ``--model.forward_solver``, rebuildable specs and
every list of choices.

A solver module registers its class once, under a short name::

    @register_solver("broyden")
    @dataclass(frozen=True, repr=False)
    class Broyden(Solver): ...

Then ``parse_solver("anderson:threshold=8,memory=5")`` builds one from text (the command line),
``solver_spec(solver)`` writes its settings as plain JSON values and ``solver_from_spec`` reads
them back; an unknown name or setting raises, listing what exists. ``scoped_solvers()`` undoes
the registrations made inside it.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from deq_attacks.solvers.base import Solver

S = TypeVar("S", bound=type[Solver])

_SOLVERS: dict[str, type[Solver]] = {}


def register_solver(name: str) -> Callable[[S], S]:
    """Class decorator: make a ``Solver`` subclass known under ``name``."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"a solver name is lower-case letters, digits and '_', got {name!r}")

    def register(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"register_solver takes a Solver subclass, got {cls!r}")
        known = _SOLVERS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"a solver named {name!r} is already registered ({known.__name__})")
        _SOLVERS[name] = cls
        return cls

    return register


@contextmanager
def scoped_solvers() -> Iterator[None]:
    """Solvers registered inside are unregistered on exit (tests, experiments)."""
    saved = dict(_SOLVERS)
    try:
        yield
    finally:
        _SOLVERS.clear()
        _SOLVERS.update(saved)


def solver_names() -> list[str]:
    """The registered solver names, sorted."""
    return sorted(_SOLVERS)


def solver_class(name: str) -> type[Solver]:
    """The class registered as ``name``; an unknown name raises listing the solvers."""
    if name not in _SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(solver_names())}")
    return _SOLVERS[name]


def solver_name(solver: Solver) -> str:
    """The registered name of ``solver``'s class (raises for an unregistered class)."""
    for name, cls in _SOLVERS.items():
        if type(solver) is cls:
            return name
    raise ValueError(f"{type(solver).__name__} is not a registered solver (register_solver)")


def setting_names(cls: type[Solver]) -> list[str]:
    """The settings (dataclass fields) of a solver class, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def make_solver(name: str, **settings: Any) -> Solver:
    """``solver_class(name)(**settings)``; an unknown setting raises listing the known ones."""
    cls = solver_class(name)
    unknown = sorted(set(settings) - set(setting_names(cls)))
    if unknown:
        raise ValueError(
            f"solver {name!r} has no setting {', '.join(map(repr, unknown))}; its settings: "
            f"{', '.join(setting_names(cls))}"
        )
    return cls(**settings)


def _parse_value(cls: type[Solver], key: str, text: str) -> Any:
    hint = typing.get_type_hints(cls)[key]
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return hint(text.strip())
        if hint in (int, float):
            return hint(text)
    except ValueError:
        choices = ""
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            choices = f" (one of {', '.join(str(m.value) for m in hint)})"
        name = getattr(hint, "__name__", str(hint))
        raise ValueError(f"solver setting {key}={text!r}: expected {name}{choices}") from None
    raise TypeError(f"solver setting {key!r} of type {hint} has no text form")


def parse_solver(spec: str, **settings: Any) -> Solver:
    """A solver from text: ``"broyden"`` or ``"anderson:threshold=8,memory=5,stop_mode=abs"``.

    ``settings`` are further settings given apart from the text (e.g. ``threshold=`` from an
    option of its own); one that the text gives too raises.
    """
    name, _, rest = spec.strip().partition(":")
    cls = solver_class(name.strip())
    given: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"solver spec {spec!r}: expected NAME:KEY=VALUE,..., got {item!r}")
        if key not in setting_names(cls):
            raise ValueError(
                f"solver {name!r} has no setting {key!r}; its settings: "
                f"{', '.join(setting_names(cls))}"
            )
        if key in settings:
            raise ValueError(
                f"the {key} is given twice (in {spec!r} and as {key}={settings[key]!r}): "
                "give it once"
            )
        given[key] = _parse_value(cls, key, text)
    return make_solver(name.strip(), **given, **settings)


def solver_spec(solver: Solver) -> dict[str, Any]:
    """The name and every setting of ``solver`` as plain JSON values (enums by value)."""
    values = {
        f.name: (v.value if isinstance(v := getattr(solver, f.name), enum.Enum) else v)
        for f in dataclasses.fields(solver)
    }
    return {"solver": solver_name(solver), **values}


def solver_from_spec(spec: Mapping[str, Any]) -> Solver:
    """The solver that ``solver_spec`` described."""
    if "solver" not in spec:
        raise ValueError(f"a solver spec needs a 'solver' name, got {dict(spec)!r}")
    settings = {k: v for k, v in spec.items() if k != "solver"}
    return make_solver(str(spec["solver"]), **settings)
