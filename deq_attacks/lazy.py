"""Lazy public names of a package (PEP 562): each name is imported from its module on first
use, so that importing the package (``deq_attacks``, ``deq_attacks.evaluation``,
``deq_attacks.training``) imports neither torch nor its modules until a name is asked for.
The command line's ``--help`` relies on it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, sources: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for the public names
    ``sources`` lists (defining module -> names). A name, once imported, is kept in the
    package's namespace; an unknown name raises AttributeError (so ``from package import
    submodule`` still finds submodules)."""
    where = {name: module for module, names in sources.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
