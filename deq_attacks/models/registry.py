"""Models by name (timm style): ``create_model("deq_large", num_classes=10, solver=...)``.

A builder registers itself with ``@register_model``; a user's own model is reached by its Python
entry point ``"package.module:function"``, which ``create_model`` imports and calls the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}

B = TypeVar("B", bound=ModelBuilder)


def register_model(builder: B) -> B:
    """Decorator: make ``builder`` available to ``create_model`` under its function name."""
    name = builder.__name__
    if name in _REGISTRY and _REGISTRY[name] is not builder:
        raise ValueError(f"a model named {name!r} is already registered")
    _REGISTRY[name] = builder
    return builder


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def resolve_builder(name: str) -> ModelBuilder:
    """The builder for a registered name or a ``"module:function"`` entry point."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"cannot import {module_name!r} for model {name!r}: {error}") from None
        builder = getattr(module, attr, None)
        if not callable(builder):
            raise ValueError(f"{module_name!r} has no callable {attr!r} (model {name!r})")
        return builder
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; registered: {', '.join(list_models())}, or give a "
            "Python entry point 'package.module:function'"
        )
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` (registered or an entry point) with ``kwargs``."""
    return resolve_builder(name)(**kwargs)
