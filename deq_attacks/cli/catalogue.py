"""The package's own registrations read from its source, without importing torch: the name
and the docstring of every solver, gradient estimate, attack column and model that a module
of the package registers with a decorator (``@register_solver("name")``, ``@register_model``).

``deq-attacks list`` prints these when the registries are not loaded yet (a fresh process),
so that listing takes a fraction of a second; once the registries are imported (then a name
registered by user code is listed too) it reads them instead. A test checks that both agree.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]

#: kind -> (folder of the package that registers it, the decorator's name)
SOURCES: dict[str, tuple[str, str]] = {
    "solvers": ("solvers", "register_solver"),
    "estimates": ("gradients", "register_estimate"),
    "attacks": ("evaluation/attacks", "register_attack"),
    "models": ("models", "register_model"),
}


def _registered_name(
    decorator: ast.expr, function: str, node: ast.ClassDef | ast.FunctionDef
) -> str | None:
    """The name ``decorator`` registers ``node`` under, if it is the registering decorator:
    ``@function("name")`` gives "name", a bare ``@function`` the decorated object's name."""
    if isinstance(decorator, ast.Name) and decorator.id == function:
        return node.name
    if (
        isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Name)
        and decorator.func.id == function
        and decorator.args
        and isinstance(decorator.args[0], ast.Constant)
    ):
        return str(decorator.args[0].value)
    return None


def registered(kind: str) -> list[tuple[str, str]]:
    """(name, docstring) of every registration of ``kind`` in the package's source, sorted by
    name (the registries list names sorted too)."""
    folder, function = SOURCES[kind]
    found: dict[str, str] = {}
    for path in sorted((PACKAGE / folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                continue
            for decorator in node.decorator_list:
                name = _registered_name(decorator, function, node)
                if name is not None:
                    found[name] = inspect.cleandoc(ast.get_docstring(node, clean=False) or "")
    return sorted(found.items())
