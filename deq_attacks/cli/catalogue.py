"""The package's own registrations read from its source, without importing torch: the name
and the docstring of every solver, gradient estimate, attack column and model that a module
of the package registers with a decorator (``@register_solver("name")``, ``@register_model``),
and each attack's spec settings with their defaults.

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


def _is_classvar(annotation: ast.expr) -> bool:
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return isinstance(target, ast.Name) and target.id == "ClassVar"


def spec_defaults(node: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> list[tuple[str, str]]:
    """(setting, default as source text) of an attack class's spec: its dataclass fields and
    those of its bases in the same module (each less the shared settings it ``takes``)."""
    fields: dict[str, str] = {}
    takes: set[str] = set()
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields.update(spec_defaults(classes[base.id], classes))
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        name = item.target.id
        if _is_classvar(item.annotation):
            if name == "takes" and isinstance(item.value, ast.Tuple):
                takes |= {str(e.value) for e in item.value.elts if isinstance(e, ast.Constant)}
            continue
        fields[name] = ast.unparse(item.value) if item.value is not None else "required"
    return [(k, v) for k, v in fields.items() if k not in takes]


def attack_settings() -> dict[str, str]:
    """Registered attack name -> its spec's settings with their defaults (``settings_text``)."""
    folder, function = SOURCES["attacks"]
    found = {}
    for path in sorted((PACKAGE / folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for node in classes.values():
            for decorator in node.decorator_list:
                name = _registered_name(decorator, function, node)
                if name is not None:
                    found[name] = settings_text(spec_defaults(node, classes))
    return found


def settings_text(settings: list[tuple[str, str]]) -> str:
    """``"iterations=100, queries=5000"`` (``"none"`` without settings)."""
    return ", ".join(f"{k}={v}" for k, v in settings) or "none"


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
