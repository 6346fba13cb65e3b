"""The solver registry: names, text specs, rebuildable specs, and a new solver added from here."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from deq_attacks import DEQ, DEQEstimator, Final
from deq_attacks.solvers import (
    Anderson,
    Broyden,
    FixedPointIteration,
    Solver,
    StopMode,
    make_solver,
    parse_solver,
    register_solver,
    solver_from_spec,
    solver_names,
    solver_spec,
)
from deq_attacks.solvers.base import _Recorder
from deq_attacks.solvers.trajectory import Trajectory


def test_the_package_solvers_are_registered() -> None:
    assert {"broyden", "anderson", "fixed_point"} <= set(solver_names())
    assert isinstance(make_solver("broyden"), Broyden)
    assert make_solver("fixed_point", damping=0.5) == FixedPointIteration(damping=0.5)


def test_parse_solver_reads_every_kind_of_setting() -> None:
    solver = parse_solver("anderson:threshold=12, memory=3,tol=1e-5,stop_mode=abs,lam=0.01")
    assert solver == Anderson(threshold=12, memory=3, tol=1e-5, stop_mode=StopMode.ABS, lam=0.01)
    assert parse_solver("broyden:return_best=false") == Broyden(return_best=False)
    assert parse_solver(" broyden ") == Broyden()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("newton", "unknown solver 'newton'; choose one of anderson, broyden, fixed_point"),
        ("broyden:memory=3", "solver 'broyden' has no setting 'memory'; its settings: threshold"),
        ("anderson:memory=three", "solver setting memory='three': expected int"),
        ("anderson:stop_mode=max", "expected StopMode (one of abs, rel)"),
        ("broyden:threshold", "expected NAME:KEY=VALUE"),
        ("broyden:threshold=0", "threshold must be at least 1"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_solver(spec)


@pytest.mark.parametrize(
    "solver",
    [
        Broyden(threshold=5, alpha=0.5),
        Anderson(memory=2, stop_mode=StopMode.ABS),
        FixedPointIteration(),
    ],
)
def test_specs_are_json_and_rebuild_the_same_solver(solver: Solver) -> None:
    spec = json.loads(json.dumps(solver_spec(solver)))
    assert solver_from_spec(spec) == solver


def test_a_name_cannot_be_taken_twice() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_solver("broyden")(Anderson)
    with pytest.raises(TypeError, match="Solver subclass"):
        register_solver("not_a_solver")(int)  # type: ignore[type-var]


# --- a new solver, from this file alone: one class and one registration ---------------------


@register_solver("test_halving")
@dataclass(frozen=True, repr=False)
class HalvingIteration(Solver):
    """z_{n+1} = (z_n + f(z_n)) / 2 (damped iteration), written only here."""

    def _solve(self, rec: _Recorder) -> Trajectory:
        for n in range(1, self.threshold + 1):
            z_new = 0.5 * (rec.z + rec.fz)
            rec.record(n, z_new, rec.evaluate(z_new))
            if not rec.active.any():
                break
        return rec.finish()


def test_a_solver_added_from_a_test_file_drives_a_deq_end_to_end() -> None:
    solver = parse_solver("test_halving:threshold=30,tol=1e-6")
    assert isinstance(solver, HalvingIteration)
    assert solver_from_spec(solver_spec(solver)) == solver
    torch.manual_seed(0)
    weight = 0.3 * torch.randn(6, 6) / 6**0.5
    f = _Affine(weight)
    deq = DEQ(f, torch.nn.Identity(), torch.nn.Linear(6, 3), solver=solver, readout=Final())
    estimator = DEQEstimator(deq, input_shape=(6,), nb_classes=3, clip_values=None)
    x = torch.rand(4, 6)
    logits = estimator.predict(x.numpy())
    z_star = torch.linalg.solve(torch.eye(6) - weight, x.T).T  # z = W z + x
    expected = deq.head(f(z_star, x)).detach().numpy()
    assert logits.shape == (4, 3)
    assert abs(logits - expected).max() < 1e-4


class _Affine(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T + x
