"""``--help`` is fast: the command line, its option sets and the packages ``deq_attacks``,
``deq_attacks.evaluation`` and ``deq_attacks.training`` import no torch (checked in fresh
interpreters), while every public name of the lazy packages still resolves to its object and
type checkers see the same names."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAZY = ["deq_attacks", "deq_attacks.evaluation", "deq_attacks.training"]


def fresh(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


NO_TORCH = "\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'deq' in m)\n"


@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"], ["train", "--help"],
                                  ["list", "--help"]])  # fmt: skip
def test_help_imports_no_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom deq_attacks.cli import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as stop:\n    code = stop.code\n"
        "assert code in (0, None), code" + NO_TORCH
    )
    result = fresh(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: deq-attacks" in result.stdout
    if argv[0] == "evaluate":  # the option set is the dataclass's, help and all
        text = " ".join(result.stdout.split())
        assert (
            "--long_steps LONG_STEPS, --long-steps LONG_STEPS PGD steps of the more-steps check "
            "(more than steps)." in text
        )
        assert "--mode {TABLE,CASCADE,VERDICT}" in text and "--model.args ARGS" in text
        assert "--sweep_mode {GRID,RACING}" in text and "--dry_run" in text


def test_packages_and_config_dataclasses_import_no_torch() -> None:
    code = (
        "import sys\nimport deq_attacks, deq_attacks.evaluation, deq_attacks.training\n"
        "from deq_attacks.evaluation import EvaluationConfig, SweepConfig, ThreatModel\n"
        "from deq_attacks.training import TrainConfig\n"
        "from deq_attacks.cli.evaluate import build_parser\n"
        "from deq_attacks.cli.train import build_parser as train_parser\n"
        "build_parser(); train_parser(); ThreatModel(0.1, 0.01, 3)" + NO_TORCH
        # validating a config consults the registries: that is where torch comes in
        + "TrainConfig()\nassert 'torch' in sys.modules\n"
    )
    result = fresh(code)
    assert result.returncode == 0, result.stderr[-2000:]


def type_checking_names(package: str) -> set[str]:
    """The names the ``if TYPE_CHECKING:`` block of ``package``'s ``__init__`` imports."""
    path = ROOT / Path(*package.split(".")) / "__init__.py"
    tree = ast.parse(path.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n))
    return {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom)
            for a in n.names}  # fmt: skip


@pytest.mark.parametrize("package", LAZY)
def test_every_public_name_resolves_and_type_checkers_see_the_same(package: str) -> None:
    module = importlib.import_module(package)
    public = set(module.__all__)
    assert type_checking_names(package) == public
    assert public <= set(dir(module))
    for name in sorted(public):
        value = getattr(module, name)
        defining = getattr(value, "__module__", None)
        if defining is not None and defining.startswith("deq_attacks"):
            assert getattr(importlib.import_module(defining), name, value) is value
    extra = {n for n in dir(module) if not n.startswith("_")} - public
    submodules = {p.stem for p in (ROOT / Path(*package.split("."))).iterdir()}
    assert extra - submodules <= {"TYPE_CHECKING", "lazy_exports"}, extra - submodules
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        _ = module.NoSuchName


def test_the_estimator_drops_in_from_the_top_level() -> None:
    from deq_attacks import DEQEstimator
    from deq_attacks.interfaces import DEQEstimator as Defined

    assert DEQEstimator is Defined
    assert "DEQEstimator" in dir(importlib.import_module("deq_attacks"))
