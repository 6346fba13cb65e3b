"""Estimates by name and the sweep families: specs round-trip, text parses, errors list the
choices, the plan for a solver, and "a new estimate is one module plus one export": a per-step
family defined in this file alone becomes a sweep family and a pair of protocol columns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from evaluation_fixtures import splits, tiny_estimator
from test_estimator_api import ESTIMATES, batch, tanh_deq
from torch import Tensor, nn

from deq_attacks import (
    Adjoint,
    Anderson,
    BackpropThroughSolver,
    Broyden,
    Early,
    Exact,
    Final,
    FixedPointIteration,
    GradientEnsemble,
    InverseEstimate,
    Phantom,
    Unrolled,
)
from deq_attacks.cli import listing
from deq_attacks.cli.evaluate import add_sweep_option
from deq_attacks.cli.options import new_parser
from deq_attacks.evaluation import SweepConfig, ThreatModel, protocol_estimates, run_sweep
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.gradients import (
    BackwardPass,
    GradientEstimate,
    PerStepEstimate,
    SweepFamily,
    SweepParameter,
    estimate_from_spec,
    estimate_names,
    estimate_spec,
    input_gradient,
    loss_cotangent,
    parse_estimate,
    register_estimate,
    register_sweep_family,
    scoped_registry,
    step_parameter,
    sweep_families,
)
from deq_attacks.gradients.base import StepWeights, unrolled_injection_gradient, weighted_sum
from deq_attacks.numerics import check_step, check_unroll

# --- the registry -----------------------------------------------------------------------------


def test_the_paper_estimates_are_registered() -> None:
    paper = {"exact", "phantom", "unrolled", "adjoint", "adjoint_broyden", "ensemble", "bptt"}
    assert paper <= set(estimate_names())
    assert [f.name for f in sweep_families()][:2] == ["adjoint", "unrolled"]


@pytest.mark.parametrize(
    "estimate",
    [*ESTIMATES, BackpropThroughSolver(checkpoint=True), Adjoint(n=2, reuse_forward=True)],
    ids=repr,
)
def test_specs_round_trip_through_json(estimate: GradientEstimate) -> None:
    spec = estimate_spec(estimate)
    rebuilt = estimate_from_spec(json.loads(json.dumps(spec)))
    assert rebuilt == estimate and type(rebuilt) is type(estimate)


def test_spec_forms_are_plain_json_with_nested_solvers_and_estimates() -> None:
    assert estimate_spec(Adjoint(n=4, beta=1.0)) == {
        "estimate": "adjoint",
        "n": 4,
        "beta": 1.0,
        "inverse": "broyden",
        "transpose": True,
        "reuse_forward": False,
    }
    ensemble = estimate_spec(GradientEnsemble(Unrolled(k=2, lam=0.5)))
    assert ensemble == {
        "estimate": "ensemble",
        "of": {"estimate": "unrolled", "n": None, "k": 2, "lam": 0.5},
    }
    exact = estimate_spec(Exact(Broyden(threshold=12, tol=1e-5), on_backward=print))
    assert exact["backward_solver"]["solver"] == "broyden"
    assert exact["backward_solver"]["threshold"] == 12
    assert set(exact) == {"estimate", "backward_solver"}  # the callback is not part of it


def test_text_forms_parse_to_equal_estimates() -> None:
    assert parse_estimate("unrolled:n=1,k=5,lam=1.0") == Unrolled(1, 5, 1.0)
    assert parse_estimate("phantom") == Phantom()
    assert parse_estimate(" adjoint : n=4, inverse=negative_identity, transpose=false ") == Adjoint(
        n=4, inverse=InverseEstimate.NEGATIVE_IDENTITY, transpose=False
    )
    assert parse_estimate("ensemble:of=(adjoint:beta=1.0)") == GradientEnsemble(Adjoint(beta=1.0))
    assert parse_estimate("ensemble:of=unrolled") == GradientEnsemble(Unrolled())
    assert parse_estimate("exact:backward_solver=(anderson:threshold=9,memory=3)") == Exact(
        Anderson(threshold=9, memory=3)
    )
    assert parse_estimate("unrolled:n=none,k=2") == Unrolled(None, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adjiont", "unknown gradient estimate 'adjiont'; choose one of adjoint, adjoint_broyden"),
        ("unrolled:m=2", "no setting 'm'; its settings: n, k, lam"),
        ("unrolled:k=two", "k='two': expected int"),
        ("adjoint:inverse=dense", "one of broyden, negative_identity"),
        ("unrolled:k", "expected NAME:KEY=VALUE"),
        ("ensemble:of=(adjoint:beta=1.0", "unbalanced"),
        ("unrolled:lam=0", "lambda"),
    ],
)
def test_bad_text_names_the_problem_and_the_choices(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_estimate(text)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="needs its name under 'estimate'"):
        estimate_from_spec({"n": 1})
    with pytest.raises(ValueError, match="its settings: checkpoint"):
        estimate_from_spec({"estimate": "bptt", "k": 1})
    with pytest.raises(ValueError, match="setting 'of' takes a nested spec"):
        estimate_from_spec({"estimate": "ensemble", "of": "adjoint"})
    with pytest.raises(ValueError, match="already registered"):
        register_estimate("adjoint")(Unrolled)


# --- plans --------------------------------------------------------------------------------------


def test_the_adjoint_plan_over_a_solver_without_inverse_estimates() -> None:
    config = SweepConfig({"adjoint": {"n": "1,2", "beta": "1.0"}, "unrolled": {"k": "1"}})
    for solver in (Anderson(threshold=3), FixedPointIteration(threshold=3)):
        plan = {p.family: p for p in config.plan(solver)}
        adjoint = plan["adjoint"]
        assert adjoint.runs and adjoint.fixed == {"inverse": InverseEstimate.NEGATIVE_IDENTITY}
        assert f"{type(solver).__name__} keeps no inverse-Jacobian estimate" in adjoint.reason
        assert "AdjointBroyden" in adjoint.left_out[0]
        assert json.loads(json.dumps(adjoint.to_json()))["fixed"] == {
            "inverse": "negative_identity"
        }
        candidates = config.candidates(solver)["adjoint"]
        assert candidates == [
            Adjoint(n=n, beta=1.0, inverse=InverseEstimate.NEGATIVE_IDENTITY) for n in (1, 2)
        ]
    broyden = {p.family: p for p in config.plan(Broyden(threshold=3))}
    assert broyden["adjoint"].fixed == {} and broyden["adjoint"].left_out == ()
    assert config.candidates(Broyden(threshold=3))["unrolled"] == [
        Unrolled(n, 1, lam) for n in (1, 2, 3) for lam in (0.5, 1.0)
    ]


def test_default_grids_are_the_papers() -> None:
    candidates = SweepConfig().candidates(Broyden(threshold=2))
    assert candidates["adjoint"] == [Adjoint(n, b) for n in (1, 2) for b in (0.5, 1.0)]
    assert candidates["unrolled"] == [
        Unrolled(n, k, lam) for n in (1, 2) for k in (1, 2, 5) for lam in (0.5, 1.0)
    ]


def test_sweep_config_is_validated_against_the_families() -> None:
    with pytest.raises(ValueError, match="unknown sweep family 'adjiont'; choose one of adjoint"):
        SweepConfig({"adjiont": {"n": "1"}})
    with pytest.raises(ValueError, match="has no parameter 'beta'; its parameters: n, k, lam"):
        SweepConfig({"unrolled": {"beta": "1"}})
    with pytest.raises(ValueError, match=r"sweep adjoint.beta=1.5"):
        SweepConfig({"adjoint": {"beta": "1.5"}})
    with pytest.raises(ValueError, match="'all' is only for the step index"):
        SweepConfig({"unrolled": {"k": "all"}})
    with pytest.raises(ValueError, match="FAMILY.PARAM=VALUES"):
        SweepConfig.from_items(["unrolled=1"])
    config = SweepConfig.from_items(["unrolled.k=1,5", "unrolled.lam=1.0", "adjoint.n=2"])
    assert config == SweepConfig({"unrolled": {"k": "1,5", "lam": "1.0"}, "adjoint": {"n": "2"}})
    assert hash(config) == hash(SweepConfig.from_items(["adjoint.n=2", "unrolled.lam=1.0",
                                                          "unrolled.k=1,5"]))  # fmt: skip
    assert config.updated({"adjoint": {"n": "1"}}).grid("adjoint") == {"n": "1", "beta": "0.5,1.0"}


def test_the_sweep_option_parses_repeated_items(capsys) -> None:
    parser = new_parser("test", None)
    add_sweep_option(parser)
    args = parser.parse_args(["--sweep", "unrolled.k=1,5", "--sweep", "adjoint.beta=1.0"])
    assert SweepConfig.from_items(args.sweep).grids == {
        "unrolled": {"k": "1,5"},
        "adjoint": {"beta": "1.0"},
    }
    assert "deq-attacks list sweeps" in " ".join(parser.format_help().split())
    assert listing.main(["sweeps"]) == 0  # the defaults, from the registry
    assert "unrolled.lam=0.5,1.0" in capsys.readouterr().out


# --- a new estimate from this file alone ----------------------------------------------------


@dataclass(frozen=True)
class DampedStep(PerStepEstimate):
    """One damped step from z_n: autograd through ``z_n + lam (f(z_n) - z_n)``. (It equals
    ``Unrolled(n, k=1, lam)``, which makes it checkable.)"""

    n: int | None = None
    lam: float = 1.0

    def __post_init__(self) -> None:
        check_step(self.n, "DampedStep")
        check_unroll(1, self.lam)

    def keep_steps(self, threshold: int) -> frozenset[int]:
        return frozenset({threshold if self.n is None else self.n})

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        n = backward.trajectory.threshold if self.n is None else self.n
        return self.weighted(backward, {n: torch.ones(backward.injection.shape[0])})

    def weighted(self, backward: BackwardPass, weights: StepWeights) -> Tensor:
        state = backward.trajectory.state
        return weighted_sum(
            backward,
            weights,
            lambda n: unrolled_injection_gradient(backward, state(n), 1, self.lam),
        )


DAMPED_FAMILY = SweepFamily(
    "damped_step",
    DampedStep,
    (step_parameter(), SweepParameter("lam", float, "0.5,1.0", check=lambda v: check_unroll(1, v))),
)


@pytest.fixture
def registered() -> Iterator[None]:
    """DampedStep and its family registered for one test only."""
    with scoped_registry():
        register_estimate("damped_step")(DampedStep)
        register_sweep_family(DAMPED_FAMILY)
        yield
    assert "damped_step" not in estimate_names()
    assert "damped_step" not in [f.name for f in sweep_families()]


def test_a_new_estimate_registers_and_round_trips(registered: None) -> None:
    assert "damped_step" in estimate_names()
    assert parse_estimate("damped_step:n=2,lam=0.5") == DampedStep(2, 0.5)
    assert estimate_from_spec(estimate_spec(DampedStep(3, 1.0))) == DampedStep(3, 1.0)
    # it computes what it says (Unrolled(n, 1, lam)), also inside a GradientEnsemble
    deq = tanh_deq()
    x, y = batch()
    cotangent = loss_cotangent(nn.CrossEntropyLoss(), torch.from_numpy(y))
    for ours, theirs in [
        (DampedStep(2, 0.5), Unrolled(2, 1, 0.5)),
        (GradientEnsemble(DampedStep(lam=0.5)), GradientEnsemble(Unrolled(k=1, lam=0.5))),
    ]:
        torch.testing.assert_close(
            input_gradient(deq, ours, torch.from_numpy(x), cotangent),
            input_gradient(deq, theirs, torch.from_numpy(x), cotangent),
        )


def test_a_new_family_joins_the_sweep_and_the_columns(registered: None) -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits(8)
    config = SweepConfig(
        {
            "adjoint": {"n": "2", "beta": "1.0"},
            "unrolled": {"n": "2", "k": "1", "lam": "1.0"},
            "damped_step": {"n": "1,2", "lam": "1.0"},
        }
    )
    threat = ThreatModel(eps=0.1, step=0.05, steps=1)
    defenses = {"final": Final(), "early": Early(2)}
    sweep = run_sweep(estimator, config, x, y, threat, defenses, "early", Shards())
    chosen, entries, plan = sweep.chosen, sweep.entries, sweep.plan
    assert [p["family"] for p in plan] == ["adjoint", "unrolled", "damped_step"]
    mine = [e for e in entries if e["family"] == "damped_step"]
    assert [e["params"] for e in mine] == [{"n": 1, "lam": 1.0}, {"n": 2, "lam": 1.0}]
    assert [estimate_from_spec(e["spec"]) for e in mine] == [DampedStep(1, 1.0), DampedStep(2, 1.0)]
    # a damped step of lam 1 from z_2 is Unrolled(2, 1, 1.0): the same shared PGD run
    unrolled = next(e for e in entries if e["family"] == "unrolled")
    assert mine[1]["accuracy"] == pytest.approx(unrolled["accuracy"])
    pick = chosen["damped_step"]
    assert isinstance(pick, DampedStep)
    columns = protocol_estimates(Phantom(2, 0.5), chosen)
    assert list(columns) == [
        "ready-made",
        "exact",
        "adjoint z_2",
        "unrolled z_2",
        f"damped_step z_{pick.n}",
        "ens. adjoint",
        "ens. unrolled",
        "ens. damped_step",
    ]
    assert columns["ens. damped_step"] == GradientEnsemble(DampedStep(lam=1.0))


def test_the_sweep_and_its_columns_run_over_anderson_with_the_planned_adjoint() -> None:
    estimator = tiny_estimator(trained=True)
    estimator.deq.solver = Anderson(threshold=4)  # a solver without inverse estimates
    (x, y), _ = splits(8)
    config = SweepConfig(
        {"adjoint": {"n": "1,4", "beta": "1.0"}, "unrolled": {"n": "4", "k": "1", "lam": "1.0"}}
    )
    threat = ThreatModel(eps=0.1, step=0.05, steps=1)
    defenses = {"final": Final(), "early": Early(2)}
    sweep = run_sweep(estimator, config, x, y, threat, defenses, "early", Shards())
    chosen, entries, plan = sweep.chosen, sweep.entries, sweep.plan
    assert plan[0]["fixed"] == {"inverse": "negative_identity"}
    assert "Anderson keeps no inverse-Jacobian estimate" in plan[0]["reason"]
    assert chosen["adjoint"].inverse is InverseEstimate.NEGATIVE_IDENTITY  # type: ignore[attr-defined]
    assert len(entries) == 3
    columns = protocol_estimates(Phantom(2, 0.5), chosen)
    for estimate in columns.values():
        estimate.check(estimator.deq.solver)  # every column is computable over Anderson
    assert columns["ens. adjoint"] == GradientEnsemble(
        Adjoint(beta=1.0, inverse=InverseEstimate.NEGATIVE_IDENTITY)
    )
