"""Models by name (timm style): ``create_model("deq_large", num_classes=10, solver=...)``.

A builder registers itself with ``@register_model`` (``MODELS``, a
``deq_attacks.registry.Registry``: its one name rule); a user's own model is reached by its
Python entry point ``"package.module:function"``, which ``create_model`` imports and calls the
same way.
``builder_keywords`` reads what a builder accepts (its signature), so that a caller can refuse
an option the builder would not take before building anything.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from deq_attacks.registry import Registry, entry_point

ModelBuilder = Callable[..., nn.Module]

#: Every model builder, by its function name.
MODELS: Registry[ModelBuilder] = Registry("model")

B = TypeVar("B", bound=ModelBuilder)


def register_model(builder: B) -> B:
    """Decorator: make ``builder`` available to ``create_model`` under its function name."""
    return MODELS.register()(builder)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def resolve_builder(name: str) -> ModelBuilder:
    """The builder for a registered name or a ``"module:function"`` entry point.

    Raises:
        ValueError: an unknown name, a module that does not import (any error while importing
            it, named), or an attribute that is missing or not callable.
    """
    if ":" in name:
        builder = entry_point(name, f"model {name!r}")
        if not callable(builder):
            raise ValueError(
                f"{name.replace(':', '.')} is a {type(builder).__name__}, not callable "
                f"(model {name!r})"
            )
        return builder
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; registered: {MODELS.choices()}, or give a "
            "Python entry point 'package.module:function'"
        )
    return MODELS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` (registered or an entry point) with ``kwargs``."""
    return resolve_builder(name)(**kwargs)


@dataclass(frozen=True)
class BuilderKeywords:
    """What a builder's signature accepts: ``names`` (keyword-capable parameters, in order)
    and ``var_keyword`` (it has ``**kwargs``)."""

    names: tuple[str, ...]
    var_keyword: bool

    def accepts(self, keyword: str, explicit: bool = False) -> bool:
        """Whether ``keyword=`` may be passed (``explicit``: only a named parameter counts)."""
        return keyword in self.names or (self.var_keyword and not explicit)

    def __str__(self) -> str:
        shown = ", ".join(self.names) if self.names else "no named keywords"
        return shown + (", **kwargs" if self.var_keyword else "")


def builder_keywords(builder: ModelBuilder) -> BuilderKeywords:
    """The keywords ``builder`` accepts, read with ``inspect.signature``."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"cannot read the signature of the model builder {builder!r}: {error}"
        ) from None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = signature.parameters.values()
    return BuilderKeywords(
        tuple(p.name for p in params if p.kind in kinds),
        any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params),
    )
