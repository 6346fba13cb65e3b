"""The solver registry: names, text specs, rebuildable specs, and a new solver added from here
(for one test at a time) that drives a DEQ and trains one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    scoped_solvers,
    solver_from_spec,
    solver_names,
    solver_spec,
)
from deq_attacks.solvers.base import _Recorder
from deq_attacks.solvers.trajectory import Trajectory
from deq_attacks.training import run_training
from tests.training_fixtures import tiny_preset


def test_the_package_solvers_are_registered() -> None:
    assert {"broyden", "anderson", "fixed_point"} <= set(solver_names())
    assert isinstance(make_solver("broyden"), Broyden)
    assert make_solver("fixed_point", damping=0.5) == FixedPointIteration(damping=0.5)


def test_parse_solver_reads_every_kind_of_setting() -> None:
    solver = parse_solver("anderson:threshold=12, memory=3,tol=1e-5,stop_mode=abs,lam=0.01")
    assert solver == Anderson(threshold=12, memory=3, tol=1e-5, stop_mode=StopMode.ABS, lam=0.01)
    assert parse_solver("broyden:return_best=false") == Broyden(return_best=False)
    assert parse_solver(" broyden ") == Broyden()
    # settings given apart from the text (an option of their own), each given once
    assert parse_solver("anderson:memory=3", threshold=4) == Anderson(threshold=4, memory=3)
    with pytest.raises(ValueError, match=r"the threshold is given twice \(in 'anderson:thr"):
        parse_solver("anderson:threshold=5", threshold=4)


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


@pytest.fixture
def halving() -> Iterator[None]:
    """``HalvingIteration`` registered as ``test_halving`` for one test only."""
    with scoped_solvers():
        register_solver("test_halving")(HalvingIteration)
        yield
    assert "test_halving" not in solver_names()


def test_a_registration_is_undone_outside_its_scope(halving: None) -> None:
    assert "test_halving" in solver_names()
    with scoped_solvers():
        register_solver("test_other")(HalvingIteration)
        assert {"test_halving", "test_other"} <= set(solver_names())
    assert "test_halving" in solver_names() and "test_other" not in solver_names()


def test_a_solver_added_from_a_test_file_drives_a_deq_end_to_end(halving: None) -> None:
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


def test_a_solver_added_from_a_test_file_trains_a_deq(
    halving: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_training`` with the new solver forward and backward (the exact gradient), named in
    the config alone; a spy sees both solves run with the config's thresholds."""
    thresholds: list[int] = []
    solve = HalvingIteration._solve

    def spy(self: HalvingIteration, rec: _Recorder) -> Trajectory:
        thresholds.append(self.threshold)
        return solve(self, rec)

    monkeypatch.setattr(HalvingIteration, "_solve", spy)
    config = tiny_preset(
        "cpu_exact",
        forward_solver="test_halving",
        backward_solver="test_halving:stop_mode=abs",
        forward_threshold=4,
        backward_threshold=3,
    )
    result = run_training(config, tmp_path, log=lambda _: None)
    assert isinstance(result.model, DEQ)
    assert result.model.solver == HalvingIteration(threshold=4, tol=config.model.solver_tol)
    backward = result.model.training_gradient.backward_solver  # type: ignore[attr-defined]
    assert backward == HalvingIteration(3, config.model.solver_tol, stop_mode=StopMode.ABS)
    assert {3, 4} <= set(thresholds)  # forward and backward solves ran during training
    assert result.state.epochs_done == 1
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert (recorded["model"]["forward_solver"], recorded["model"]["backward_solver"]) == (
        "test_halving",
        "test_halving:stop_mode=abs",
    )
    thresholds.clear()
    again = run_training(config, tmp_path, log=lambda _: None)  # resumes: nothing left to do
    assert again.state.epochs_done == 1 and 3 not in thresholds  # no training step ran
