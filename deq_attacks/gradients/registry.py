"""Gradient estimates by name: specs as plain JSON, text for command lines, every list of choices.

Each estimate module registers its class once, under a short name::

    @register_estimate("unrolled")
    @dataclass(frozen=True)
    class Unrolled(PerStepEstimate): ...

``ESTIMATES`` is a ``deq_attacks.registry.Registry``; the functions here are its methods
under the names the package exports. ``estimate_spec(Unrolled(n=1, k=5))`` is
``{"estimate": "unrolled", "n": 1, "k": 5, "lam": 1.0}``, ``estimate_from_spec`` rebuilds an
equal estimate, and ``parse_estimate("unrolled:n=1,k=5,lam=1.0")`` reads the command-line
form. A spec holds the dataclass fields that take part in equality: callbacks such as
``on_backward`` are not part of it. Solvers inside an estimate are written as solver specs,
estimates inside an estimate (``GradientEnsemble(of=...)``) as nested specs; in text, a nested
value is written in parentheses: ``"ensemble:of=(adjoint:beta=1.0)"``,
``"exact:backward_solver=(broyden:threshold=30,tol=1e-6)"``.

``deq_attacks.gradients.sweep_family.scoped_registry()`` undoes the registrations made inside
it (estimates and sweep families), for tests and experiments that add an estimate for a while.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from deq_attacks.gradients.base import GradientEstimate
from deq_attacks.registry import Registry

E = TypeVar("E", bound=type[GradientEstimate])

#: Every gradient estimate, by name.
ESTIMATES: Registry[type[GradientEstimate]] = Registry(
    "gradient estimate", GradientEstimate, key="estimate"
)


def register_estimate(name: str) -> Callable[[E], E]:
    """Class decorator: make a ``GradientEstimate`` dataclass known under ``name``."""
    return ESTIMATES.register(name)


def estimate_names() -> list[str]:
    """The registered estimate names, sorted."""
    return sorted(ESTIMATES)


def estimate_class(name: str) -> type[GradientEstimate]:
    """The class registered as ``name``; an unknown name raises listing the estimates."""
    return ESTIMATES[name]


def make_estimate(name: str, **params: Any) -> GradientEstimate:
    """``estimate_class(name)(**params)``; an unknown parameter raises listing the known ones."""
    estimate: GradientEstimate = ESTIMATES.make(name, **params)
    return estimate


def estimate_spec(estimate: GradientEstimate) -> dict[str, Any]:
    """The name and every parameter of ``estimate`` as plain JSON values."""
    return ESTIMATES.to_json(estimate)


def estimate_from_spec(spec: Mapping[str, Any]) -> GradientEstimate:
    """The estimate that ``estimate_spec`` described."""
    estimate: GradientEstimate = ESTIMATES.from_json(spec)
    return estimate


def parse_estimate(text: str) -> GradientEstimate:
    """An estimate from text: ``"exact"``, ``"unrolled:n=1,k=5,lam=1.0"``,
    ``"ensemble:of=(adjoint:beta=1.0)"``, ``"adjoint:n=4,inverse=negative_identity"``."""
    estimate: GradientEstimate = ESTIMATES.create(text)
    return estimate
