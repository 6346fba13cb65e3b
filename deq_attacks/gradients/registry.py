"""Gradient estimates by name: specs as plain JSON, text for command lines, every list of choices.

Each estimate module registers its class once, under a short name::

    @register_estimate("unrolled")
    @dataclass(frozen=True)
    class Unrolled(PerStepEstimate): ...

Then ``estimate_spec(Unrolled(n=1, k=5))`` is ``{"estimate": "unrolled", "n": 1, "k": 5,
"lam": 1.0}``, ``estimate_from_spec`` rebuilds an equal estimate, and
``parse_estimate("unrolled:n=1,k=5,lam=1.0")`` reads the command-line form. A spec holds the
dataclass fields that take part in equality: callbacks such as ``on_backward`` are not part of
it. Solvers inside an estimate are written with ``deq_attacks.solvers.solver_spec``, estimates
inside an estimate (``GradientEnsemble(of=...)``) as nested specs; in text, a nested value is
written in parentheses: ``"ensemble:of=(adjoint:beta=1.0)"``,
``"exact:backward_solver=(broyden:threshold=30,tol=1e-6)"``.

``deq_attacks.gradients.sweep_family.scoped_registry()`` undoes the registrations made inside
it (estimates and sweep families), for tests and experiments that add an estimate for a while.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from deq_attacks.gradients.base import GradientEstimate
from deq_attacks.solvers import Solver, parse_solver, solver_from_spec, solver_spec

E = TypeVar("E", bound=type[GradientEstimate])

_ESTIMATES: dict[str, type[GradientEstimate]] = {}


def register_estimate(name: str) -> Callable[[E], E]:
    """Class decorator: make a ``GradientEstimate`` dataclass known under ``name``."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"an estimate name is lower-case letters, digits and '_', got {name!r}")

    def register(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, GradientEstimate)):
            raise TypeError(f"register_estimate takes a GradientEstimate subclass, got {cls!r}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass: its fields make its spec")
        known = _ESTIMATES.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"an estimate named {name!r} is already registered ({known.__name__})")
        _ESTIMATES[name] = cls
        return cls

    return register


def estimate_names() -> list[str]:
    """The registered estimate names, sorted."""
    return sorted(_ESTIMATES)


def estimate_class(name: str) -> type[GradientEstimate]:
    """The class registered as ``name``; an unknown name raises listing the estimates."""
    if name not in _ESTIMATES:
        raise ValueError(
            f"unknown gradient estimate {name!r}; choose one of {', '.join(estimate_names())}"
        )
    return _ESTIMATES[name]


def estimate_name(estimate: GradientEstimate) -> str:
    """The registered name of ``estimate``'s class (raises for an unregistered class)."""
    for name, cls in _ESTIMATES.items():
        if type(estimate) is cls:
            return name
    raise ValueError(
        f"{type(estimate).__name__} is not a registered gradient estimate (register_estimate)"
    )


def parameter_names(cls: type[GradientEstimate]) -> list[str]:
    """The parameters of an estimate class: its dataclass fields that take part in equality
    (callbacks are not parameters), in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.compare and f.init]  # type: ignore[arg-type]


def _unknown(name: str, cls: type[GradientEstimate], keys: list[str]) -> ValueError:
    params = parameter_names(cls)
    return ValueError(
        f"estimate {name!r} has no parameter {', '.join(map(repr, keys))}; its parameters: "
        f"{', '.join(params) if params else '(none)'}"
    )


def make_estimate(name: str, **params: Any) -> GradientEstimate:
    """``estimate_class(name)(**params)``; an unknown parameter raises listing the known ones."""
    cls = estimate_class(name)
    unknown = sorted(set(params) - set(parameter_names(cls)))
    if unknown:
        raise _unknown(name, cls, unknown)
    return cls(**params)


def _to_json(value: Any) -> Any:
    if isinstance(value, GradientEstimate):
        return estimate_spec(value)
    if isinstance(value, Solver):
        return solver_spec(value)
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"no spec form for the value {value!r}")


def estimate_spec(estimate: GradientEstimate) -> dict[str, Any]:
    """The name and every parameter of ``estimate`` as plain JSON values."""
    params = {name: _to_json(getattr(estimate, name)) for name in parameter_names(type(estimate))}
    return {"estimate": estimate_name(estimate), **params}


def _hint(cls: type[GradientEstimate], key: str) -> tuple[Any, bool]:
    """(the type of parameter ``key`` with None removed, whether None is allowed)."""
    hint = typing.get_type_hints(cls)[key]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) == 1:
            return args[0], optional
    return hint, False


def _from_json(cls: type[GradientEstimate], key: str, value: Any) -> Any:
    hint, optional = _hint(cls, key)
    if value is None and optional:
        return None
    if isinstance(hint, type) and issubclass(hint, GradientEstimate):
        if not isinstance(value, Mapping):
            raise ValueError(f"parameter {key!r} takes a nested estimate spec, got {value!r}")
        return estimate_from_spec(value)
    if isinstance(hint, type) and issubclass(hint, Solver):
        if not isinstance(value, Mapping):
            raise ValueError(f"parameter {key!r} takes a solver spec, got {value!r}")
        return solver_from_spec(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in hint)
            raise ValueError(f"parameter {key}={value!r}: choose one of {choices}") from None
    return value


def estimate_from_spec(spec: Mapping[str, Any]) -> GradientEstimate:
    """The estimate that ``estimate_spec`` described."""
    if not isinstance(spec, Mapping) or "estimate" not in spec:
        raise ValueError(f"an estimate spec needs an 'estimate' name, got {spec!r}")
    name = str(spec["estimate"])
    cls = estimate_class(name)
    params = {k: v for k, v in spec.items() if k != "estimate"}
    unknown = sorted(set(params) - set(parameter_names(cls)))
    if unknown:
        raise _unknown(name, cls, unknown)
    return cls(**{k: _from_json(cls, k, v) for k, v in params.items()})


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _from_text(cls: type[GradientEstimate], key: str, text: str) -> Any:
    hint, optional = _hint(cls, key)
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    if optional and text.lower() in ("none", "null"):
        return None
    if isinstance(hint, type) and issubclass(hint, GradientEstimate):
        return parse_estimate(text)
    if isinstance(hint, type) and issubclass(hint, Solver):
        return parse_solver(text)
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return hint(text)
        if hint in (int, float, str):
            return hint(text)
    except ValueError:
        choices = ""
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            choices = f" (one of {', '.join(str(m.value) for m in hint)})"
        kind = getattr(hint, "__name__", str(hint))
        raise ValueError(f"estimate parameter {key}={text!r}: expected {kind}{choices}") from None
    raise TypeError(f"estimate parameter {key!r} of type {hint} has no text form")


def parse_estimate(text: str) -> GradientEstimate:
    """An estimate from text: ``"exact"``, ``"unrolled:n=1,k=5,lam=1.0"``,
    ``"ensemble:of=(adjoint:beta=1.0)"``, ``"adjoint:n=4,inverse=negative_identity"``."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    cls = estimate_class(name)
    params: dict[str, Any] = {}
    for item in _split_top(rest):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"estimate text {text!r}: expected NAME:KEY=VALUE,..., got {item!r}")
        if key not in parameter_names(cls):
            raise _unknown(name, cls, [key])
        params[key] = _from_text(cls, key, value)
    return cls(**params)


def snapshot() -> dict[str, type[GradientEstimate]]:
    """A copy of the estimate registry (``scoped_registry`` restores it)."""
    return dict(_ESTIMATES)


def restore(estimates: Mapping[str, type[GradientEstimate]]) -> None:
    """Put back a registry taken by ``snapshot``."""
    _ESTIMATES.clear()
    _ESTIMATES.update(estimates)
