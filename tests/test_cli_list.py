"""``deq-attacks list KIND``: every registered name once, one line each, from the registries
themselves (a solver registered in a test shows up)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from deq_attacks.cli import main
from deq_attacks.evaluation import attack_names
from deq_attacks.evaluation.presets import PRESETS as EVALUATION_PRESETS
from deq_attacks.gradients import sweep_families
from deq_attacks.gradients.registry import estimate_names
from deq_attacks.models import list_models
from deq_attacks.solvers import FixedPointIteration, register_solver, scoped_solvers, solver_names
from deq_attacks.training import PRESETS as TRAINING_PRESETS


def listed(kind: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The first word of each listed line of ``kind``."""
    assert main(["list", kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{kind}:"
    return [line.split()[0] for line in lines[1:] if line.startswith("  ")]


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("solvers", solver_names),
        ("estimates", estimate_names),
        ("attacks", attack_names),
        ("sweeps", lambda: [family.name for family in sweep_families()]),
        ("models", list_models),
        ("presets", lambda: [*EVALUATION_PRESETS, *TRAINING_PRESETS]),
    ],
)
def test_every_registered_name_once(kind, names, capsys) -> None:
    assert listed(kind, capsys) == list(names())


def test_a_solver_registered_later_is_listed(capsys) -> None:
    with scoped_solvers():

        @register_solver("halving")
        @dataclass(frozen=True, repr=False)
        class Halving(FixedPointIteration):
            """Fixed-point iteration with damping one half."""

        line = [x for x in (main(["list", "solvers"]), capsys.readouterr().out)[1].splitlines()
                if x.split()[:1] == ["halving"]]  # fmt: skip
    assert line == ["  halving                    Fixed-point iteration with damping one half."]


def test_all_kinds_and_a_bad_kind(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{kind}:\n" in f"\n{out}" for kind in ("solvers", "models", "presets"))
    assert main(["list", "datasets"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deq-attacks list: ") and "datasets" in err and err.count("\n") == 1


def test_registries_are_listed_without_torch_as_the_registries_list_them() -> None:
    """In a fresh interpreter, solvers/estimates/attacks/models come from the source without
    importing torch, and read the same as the loaded registries afterwards."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\nfrom deq_attacks.cli import main, listing\n"
        "kinds = ['solvers', 'estimates', 'attacks', 'models']\n"
        "cold = {k: listing.KINDS[k]() for k in kinds}\nassert main(['list', 'attacks']) == 0\n"
        "assert 'torch' not in sys.modules\n"
        "import deq_attacks.solvers, deq_attacks.gradients.registry, deq_attacks.models\n"
        "import deq_attacks.evaluation.attacks\n"
        "for k in kinds:\n    assert listing.KINDS[k]() == cold[k], k\n"
        "    assert len(cold[k]) > 2\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "square " in result.stdout
