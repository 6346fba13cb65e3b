"""Randomness: the randomized-threshold solver (the paper's RAND_F_THRES_DELTA) and
expectation over transformation (EOT) in the gradient columns, switched on by the protocol when
the model's output is randomized."""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest
import torch
from evaluation_fixtures import AA, TINY, splits, tiny_estimator
from torch import Tensor, nn

from deq_attacks import DEQ, BackpropThroughSolver, DEQEstimator, FixedPointIteration
from deq_attacks.data import load_digits
from deq_attacks.evaluation import EvaluationConfig, ThreatModel, evaluate_model, fixed_step_pgd
from deq_attacks.evaluation.attacks import DefendedModel
from deq_attacks.solvers import parse_solver, solver_from_spec, solver_spec

NOISE_AMPLITUDE, NOISE_FREQUENCY = 0.01, 5000.0


class Injection(nn.Module):
    """x -> [linear logits c(x) (10), A sin(K x) per pixel (64)]: the second part is small in
    value but has a large gradient (A K)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        noise = NOISE_AMPLITUDE * torch.sin(NOISE_FREQUENCY * flat)
        return torch.cat([self.linear(flat), noise], dim=1)


class Flip(nn.Module):
    """f(z; inj) = [c(x), -z_noise] from z_0 = [0, noise]: the noise part flips sign each step,
    so which sign the answer has is the parity of the number of steps run."""

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.cat([inj[:, :10], -z[:, 10:]], dim=1)

    def init_state(self, inj: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(inj[:, :10]), inj[:, 10:]], dim=1)


class Head(nn.Module):
    """logits = c + M z_noise: the noise adds at most about 0.1 to a logit."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("mix", torch.randn(64, 10, generator=generator))

    def forward(self, z: Tensor) -> Tensor:
        return z[:, :10] + z[:, 10:] @ self.mix


@cache
def _linear_weights() -> dict[str, Tensor]:
    """A logistic regression on 600 digits (L-BFGS, deterministic)."""
    data = load_digits()
    x, y = torch.as_tensor(data.x[:600]).flatten(1), torch.as_tensor(data.y[:600])
    linear = nn.Linear(64, 10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linear.reset_parameters()
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=100)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return {k: v.detach().clone() for k, v in linear.state_dict().items()}


def randomized_deq(rand_delta: int = 1) -> DEQEstimator:
    """A tiny DEQ whose randomized threshold (4 or 3 steps) decides the sign of a term with a
    large gradient: one draw's gradient points along +-that term, the mean over draws along
    the linear classifier's."""
    linear = nn.Linear(64, 10)
    linear.load_state_dict(_linear_weights())
    solver = FixedPointIteration(threshold=4, tol=0.0, return_best=False, rand_delta=rand_delta)
    deq = DEQ(Flip(), Injection(linear), Head(), solver=solver, input_shape=(1, 8, 8))
    return DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=10)


def test_the_randomized_threshold_is_drawn_per_solve_in_its_range() -> None:
    solver = parse_solver("fixed_point:threshold=8,rand_delta=3,tol=0")
    assert solver.rand_delta == 3 and repr(solver) == "FixedPointIteration(tol=0.0, rand_delta=3)"
    assert solver_from_spec(solver_spec(solver)) == solver
    fn = lambda z: torch.tanh(0.5 * z + 1)  # noqa: E731
    torch.manual_seed(0)
    steps = [solver.solve(fn, torch.zeros(2, 3), keep=True).num_steps for _ in range(200)]
    assert set(steps) == {5, 6, 7, 8}
    trajectory = solver.solve(fn, torch.zeros(2, 3), keep=True, limit=5)
    assert trajectory.num_steps == 5 and trajectory.threshold == 8
    assert torch.equal(trajectory.state(8), trajectory.state(5))  # later iterates are frozen
    fixed = parse_solver("fixed_point:threshold=8,tol=0")
    assert {fixed.solve(fn, torch.zeros(2, 3)).num_steps for _ in range(20)} == {8}
    with pytest.raises(ValueError, match="rand_delta must be in 0..threshold-1 = 0..1"):
        parse_solver("broyden:threshold=2,rand_delta=2")


def test_a_randomized_threshold_randomizes_the_deq_and_early_exits_see_the_same_draw() -> None:
    estimator = randomized_deq()
    _, (x, _) = splits()
    xt = torch.as_tensor(x)
    torch.manual_seed(1)
    with torch.no_grad():
        outputs = [estimator.deq(xt) for _ in range(20)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])
    # the two draws are the two signs of the noise term, nothing else
    signs = {round(float((o - outputs[0]).abs().max()), 6) for o in outputs}
    assert len(signs) == 2 and 0.0 in signs
    # without rand_delta the same DEQ is deterministic
    fixed = randomized_deq(rand_delta=0)
    with torch.no_grad():
        assert torch.equal(fixed.deq(xt), fixed.deq(xt))


def test_eot_lowers_robust_accuracy_against_single_draw_gradients() -> None:
    estimator = randomized_deq()
    data = load_digits()
    x, y = data.x[1200:1264], data.y[1200:1264]
    threat = ThreatModel(eps=0.1, step=0.02, steps=20)
    bptt = BackpropThroughSolver()

    def robust(draws: int) -> float:
        torch.manual_seed(0)
        x_adv = fixed_step_pgd(estimator, bptt, x, y, threat, eot_draws=draws)
        assert np.abs(x_adv - x).max() <= threat.eps + 1e-6
        return float((fixed_step_pgd_correct(estimator, x_adv, y)).mean())

    clean = float((estimator.predict(x).argmax(1) == y).mean())
    single, eot = robust(1), robust(20)
    assert clean >= 0.9
    assert single >= clean - 0.15  # one draw's gradient is the noise term's: PGD barely moves
    assert eot <= single - 0.2  # the mean over draws finds the classifier's direction


def fixed_step_pgd_correct(estimator: DEQEstimator, x_adv: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Correct under one draw of the randomized model (torch's generator seeded 0)."""
    torch.manual_seed(0)
    return estimator.predict(x_adv).argmax(1) == y


def test_eot_with_one_draw_is_todays_gradient() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits(8)
    threat = ThreatModel(eps=0.1, step=0.05, steps=3)
    estimate = estimator.gradient_estimate
    plain = fixed_step_pgd(estimator, estimate, x, y, threat)
    np.testing.assert_array_equal(plain, fixed_step_pgd(estimator, estimate, x, y, threat,
                                                        eot_draws=1))  # fmt: skip
    # a deterministic model: more draws average equal gradients, the same signed steps
    np.testing.assert_array_equal(plain, fixed_step_pgd(estimator, estimate, x, y, threat,
                                                        eot_draws=3))  # fmt: skip
    xt = torch.as_tensor(x)
    with torch.no_grad():
        one = DefendedModel.of(estimator)(xt)
        assert torch.equal(one, estimator.model(xt).float())
        torch.testing.assert_close(DefendedModel.of(estimator, draws=3)(xt), one)
    with pytest.raises(ValueError, match="eot_draws must be an int >= 1"):
        EvaluationConfig(eot_draws=0)


def test_autoattack_and_art_columns_receive_the_draws() -> None:
    from deq_attacks.evaluation.attacks import ArtAPGDCE, AutoAttackSettings
    from deq_attacks.evaluation.attacks.autoattack import build_standard

    estimator = tiny_estimator(trained=True)
    averaged = DefendedModel.of(estimator, draws=4)
    attack = build_standard(DefendedModel.of(estimator), 0.1, AutoAttackSettings(2, 5, 2), 10, 0,
                            "cpu", eot_draws=4, fab_model=averaged)  # fmt: skip
    assert attack.apgd.eot_iter == 4 and attack.apgd_targeted.eot_iter == 4
    assert attack.fab.predict is averaged
    calls = []
    model = ArtAPGDCE(2, 3).target(DefendedModel.of(estimator))
    model.model.register_forward_hook(lambda *_: calls.append(1))
    hook = estimator.model.register_forward_hook(lambda *_: calls.append(2))
    try:
        model.predict(splits(2)[0][0])
    finally:
        hook.remove()
    assert calls.count(2) == 3  # one prediction of the ART classifier: three draws


def test_the_protocol_switches_eot_on_for_a_randomized_output_and_says_so() -> None:
    config = dataclasses.replace(
        TINY, attacks=f"pgd,{AA}", bptt=False, randomized_eot_draws=3, diagnostic_samples=8
    )
    dev, test = splits(n_dev=8, n_test=8)
    report = evaluate_model(randomized_deq(), test, dev, config)
    assert report.settings["config"]["eot_draws"] == 3
    assert report.columns["ready-made PGD"]["eot_draws"] == 3
    assert report.columns["ready-made AA"]["eot_draws"] == 3
    check = next(c for c in report.diagnostics if c.name == "randomized_output")
    assert check.verdict == "flag"
    assert "EOT switched on, every gradient column averaged its gradient over 3 draws" in (
        check.message
    )
    assert check.numbers["before_columns"]["switched_on"] is True
    # a deterministic model keeps one draw
    plain = evaluate_model(randomized_deq(rand_delta=0), test, dev, config)
    assert plain.columns["ready-made PGD"]["eot_draws"] == 1
    assert next(c for c in plain.diagnostics if c.name == "randomized_output").verdict == "pass"


def test_training_with_a_randomized_threshold(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--forward_solver broyden:rand_delta=2`` trains with a threshold drawn per forward (the
    paper's training configs' RAND_F_THRES_DELTA: 2)."""
    from deq_attacks.solvers import Broyden
    from deq_attacks.training import run_training
    from tests.training_fixtures import tiny_preset

    limits: list[int] = []
    solve = Broyden._solve

    def spy(self: Broyden, rec) -> object:  # type: ignore[no-untyped-def]
        if self.rand_delta:
            limits.append(rec.limit)
        return solve(self, rec)

    monkeypatch.setattr(Broyden, "_solve", spy)
    config = tiny_preset("cpu_exact", forward_solver="broyden:rand_delta=2",
                         forward_threshold=4, solver_tol=0.0)  # fmt: skip
    result = run_training(config, tmp_path, log=lambda _: None)
    assert result.model.solver == Broyden(threshold=4, tol=0.0, rand_delta=2)
    assert set(limits) == {2, 3, 4}
