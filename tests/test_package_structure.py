"""The package has no import circle: every module imports in any order in a fresh interpreter,
``deq_attacks.deq`` imports nothing from ``deq_attacks.gradients`` (not even lazily or for type
checking), and ``deq_attacks.numerics`` is a leaf that both build on."""

from __future__ import annotations

import ast
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deq_attacks"


def module_names() -> list[str]:
    """Every module of the package (packages included), ``__main__`` left out."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in a file of the package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    return imports_of(path.read_text(), package)


def imports_of(source: str, package: str) -> set[str]:
    """Every module named by an import statement anywhere in ``source`` (functions and
    ``if TYPE_CHECKING:`` blocks included), relative imports resolved against ``package``."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def run_imports(order: list[str]) -> subprocess.CompletedProcess[str]:
    code = "\n".join(f"import {name}" for name in order)
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_module_list_is_complete() -> None:
    names = module_names()
    assert {"deq_attacks.numerics", "deq_attacks.deq.backward", "deq_attacks.gradients",
            "deq_attacks.registry"} <= set(names)  # fmt: skip
    assert len(names) > 60


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_every_module_imports_in_this_order_in_a_fresh_interpreter(order: str) -> None:
    names = module_names()
    if order == "shuffled":
        random.Random(0).shuffle(names)
    result = run_imports(names)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_each_module_of_the_former_circle_imports_first() -> None:
    """One interpreter; before each import every ``deq_attacks`` module is dropped from
    ``sys.modules``, so each of these modules is the first of the package to load."""
    firsts = [
        "deq_attacks.deq.backward",
        "deq_attacks.deq.model",
        "deq_attacks.gradients.exact",
        "deq_attacks.gradients.base",
        "deq_attacks.gradients.ready_made",
        "deq_attacks.interfaces.whitebox",
        "deq_attacks.numerics",
    ]
    code = (
        "import importlib, sys\n"
        f"for first in {firsts!r}:\n"
        "    for name in [m for m in sys.modules if m.split('.')[0] == 'deq_attacks']:\n"
        "        del sys.modules[name]\n"
        "    importlib.import_module(first)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_deq_imports_nothing_from_gradients() -> None:
    offenders = {}
    for path in sorted((PACKAGE / "deq").glob("*.py")):
        bad = {m for m in imported_modules(path) if m.startswith("deq_attacks.gradients")}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_numerics_is_a_leaf_on_torch_and_the_solvers() -> None:
    ours = {
        m.split(".")[0] if not m.startswith("deq_attacks") else ".".join(m.split(".")[:2])
        for m in imported_modules(PACKAGE / "numerics.py")
    }
    allowed = {"__future__", "warnings", "collections", "torch", "deq_attacks.solvers"}
    assert ours <= allowed, ours - allowed


def test_the_checker_sees_lazy_relative_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from deq_attacks.gradients.base import GradientEstimate\n"
        "def f():\n    import deq_attacks.gradients.exact\n"
        "def g():\n    from ..gradients import phantom\n"
    )
    names = imports_of(source, "deq_attacks.deq")
    assert {
        "deq_attacks.gradients.base",
        "deq_attacks.gradients.exact",
        "deq_attacks.gradients.phantom",
    } <= names


#: The layers of docs/architecture.md: what each part of the package may import from the
#: package (its own modules aside). Foundations import nothing of the package but the one
#: registry type, which imports nothing (and splits, the split rule over the data sets: data).
FOUNDATIONS = frozenset(
    {"registry", "solvers", "records", "lazy", "distributed", "reproducibility", "data",
     "splits", "checkpoints"}
)  # fmt: skip
MAY_IMPORT: dict[str, frozenset[str]] = {
    **{name: frozenset({"registry"}) for name in FOUNDATIONS},
    "registry": frozenset(),
    "splits": frozenset({"data", "registry"}),  # the split rule over the data sets
    "numerics": frozenset({"solvers"}),
    "deq": frozenset({"numerics", "solvers"}),
    "models": frozenset({"deq", "solvers", "registry"}),
    "model_spec": frozenset({"deq", "solvers", "models", "checkpoints", "registry"}),
    "adapters": frozenset({"deq", "solvers", "checkpoints", "models"}),
    "acceleration": frozenset({"deq"}),
    "gradients": frozenset({"deq", "numerics", "solvers", "registry"}),
    "interfaces": frozenset({"deq", "gradients", "numerics", "solvers"}),
    "autoattack": frozenset(),  # fra31's front door over pyautoattack: a front end
    "adversarial": FOUNDATIONS | {"numerics", "deq", "gradients", "interfaces", "acceleration"},
    "evaluation": FOUNDATIONS
    | {"numerics", "deq", "gradients", "interfaces", "acceleration", "models", "model_spec",
       "adversarial"},
    "training": FOUNDATIONS
    | {"numerics", "deq", "gradients", "interfaces", "acceleration", "models", "model_spec",
       "adversarial"},
    "cli": frozenset(
        {*FOUNDATIONS, "numerics", "deq", "gradients", "interfaces", "acceleration", "models",
         "model_spec", "adapters", "adversarial", "evaluation", "training"}
    ),  # fmt: skip
}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    """Evaluation and training never import each other or the command line; both share the
    attack layer below them, which imports neither; the numerics never import the attack side
    (docs/architecture.md)."""
    offenders: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        part = parts[0]
        if part in ("__init__", "__main__"):
            continue  # the facade and the console entry re-export everything
        assert part in MAY_IMPORT, f"{part} is in no layer of docs/architecture.md"
        used = {
            name.split(".")[1]
            for name in imported_modules(path)
            if name.startswith("deq_attacks.") and name.split(".")[1] != part
        }
        # ``from deq_attacks import distributed`` names a foundation module, not the facade
        bad = sorted(used - MAY_IMPORT[part] - {"__init__"})
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = bad
    assert offenders == {}
