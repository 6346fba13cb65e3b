"""The input-entropy-reduction defense of Yang et al. (2023): it lowers the entropy and stays in
its ball; the exact gradient through it equals finite differences; the adaptive attack is at
least as strong as the authors' non-adaptive one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from attack_fixtures import assert_valid_adversarial
from evaluation_fixtures import TINY, splits, tiny_estimator
from test_evaluation_protocol import forbid_computation

from deq_attacks import FixedPointIteration, PhantomGradient
from deq_attacks.deq.entropy import (
    InputEntropyReduction,
    entropy_defended_logits,
    lower_entropy,
    prediction_entropy,
)
from deq_attacks.evaluation import ThreatModel, evaluate_model, markdown_report
from deq_attacks.evaluation.entropy_defense import (
    EntropyDefendedModule,
    evaluate_entropy_defense,
)
from deq_attacks.evaluation.latex import latex_table
from deq_attacks.models import mlp_deq

DIGITS = InputEntropyReduction(steps=5, step=0.025, eps=0.1, every=2)


def test_the_defense_lowers_the_entropy_and_stays_in_its_ball() -> None:
    estimator = tiny_estimator(trained=True)
    deq = estimator.deq
    (x, _), _ = splits()
    xt = torch.as_tensor(x)
    with torch.no_grad():
        injection = deq.inject(xt)
        z = deq.solve(injection).final

        def entropy(images: torch.Tensor) -> torch.Tensor:
            inj = deq.inject(images)
            return prediction_entropy(deq.logits(deq.step(z, inj), inj))

        purified = lower_entropy(deq, z, xt, xt, DIGITS)
        before, after = entropy(xt), entropy(purified)
    assert_valid_adversarial(purified, x, DIGITS.eps)
    assert (purified - xt).abs().max() > 0.05  # it moved
    assert (after < before).all() and after.mean() < 0.95 * before.mean()
    defended = entropy_defended_logits(deq, xt, DIGITS)
    assert defended.shape == (len(x), 10)
    with torch.no_grad():
        undefended = deq(xt)
    assert not torch.allclose(defended, undefended, atol=1e-4)  # the defense changes the output
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        InputEntropyReduction(steps=0)
    with pytest.raises(ValueError, match="threshold 4 is below the defense's 5 solver steps"):
        entropy_defended_logits(deq, xt, InputEntropyReduction(every=5))


def test_the_adaptive_gradient_equals_finite_differences() -> None:
    torch.manual_seed(0)
    deq = mlp_deq(64, 10, hidden=8, solver=FixedPointIteration(threshold=4, tol=0.0),
                  training_gradient=PhantomGradient(2, 0.5)).double().eval()  # fmt: skip
    defense = InputEntropyReduction(steps=3, step=0.05, eps=0.1, every=2)
    module = EntropyDefendedModule(deq, defense, "bptt")
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1  # away from the [0, 1] clip
    weights = torch.randn(2, 10, dtype=torch.float64)
    probe = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad((module(probe) * weights).sum(), probe)
    assert grad.abs().max() > 0
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        h = 1e-6
        with torch.no_grad():
            plus = (module(x + h * direction) * weights).sum()
            minus = (module(x - h * direction) * weights).sum()
        numeric = float((plus - minus) / (2 * h))
        analytic = float((grad * direction).sum())
        assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-8)
    # BPDA differs from it where the [0, 1] clip holds a pixel: an input on the clip
    edge = x.clone()
    edge[:, :, :4] = 0.0
    grads = []
    for gradient in ("bptt", "bpda"):
        probe = edge.clone().requires_grad_()
        loss = (EntropyDefendedModule(deq, defense, gradient)(probe) * weights).sum()
        grads.append(torch.autograd.grad(loss, probe)[0])
    assert not torch.allclose(grads[0], grads[1])


def test_adaptive_attacks_are_at_least_as_strong_as_the_authors_non_adaptive_one() -> None:
    estimator = tiny_estimator(trained=True)
    _, (x, y) = splits(n_dev=8, n_test=16)
    threat = ThreatModel(eps=0.1, step=0.05, steps=3)
    result = evaluate_entropy_defense(estimator, x, y, threat, DIGITS, seed=0, batch_size=8)
    worst = result.correct["adaptive worst case"]
    assert worst.mean() <= result.accuracy("non-adaptive PGD")[0]
    # BPDA over the whole defense follows the non-adaptive iterates: never weaker per sample
    identity = result.correct["adaptive PGD (BPDA, identity)"]
    assert (identity <= result.correct["non-adaptive PGD"]).all()
    for column in ("adaptive PGD (BPTT)", "adaptive PGD (BPDA)", "adaptive PGD (BPDA, identity)"):
        assert (worst <= result.correct[column]).all()
    assert (worst <= result.correct["clean"]).all()
    low, high = result.accuracy("adaptive worst case")[1:]
    assert 0 <= low <= worst.mean() <= high <= 1
    assert "| non-adaptive PGD |" in result.markdown()
    # per-sample: a batch of 8 gives the same verdicts as the batch of 16
    again = evaluate_entropy_defense(estimator, x, y, threat, DIGITS, seed=0, batch_size=16)
    for column, values in result.correct.items():
        np.testing.assert_array_equal(values, again.correct[column], err_msg=column)
    with pytest.raises(ValueError, match="without preprocessing"):
        evaluate_entropy_defense(tiny_estimator(preprocessing=(0.2, 0.7)), x, y, threat, DIGITS)


#: The tiny protocol with the defense on (PGD only, the defense's settings as DIGITS).
DEFENDED = dataclasses.replace(
    TINY, attacks="pgd", bptt=False, entropy_defense=True, entropy_steps=DIGITS.steps,
    entropy_step=DIGITS.step, entropy_eps=DIGITS.eps, entropy_every=DIGITS.every,
)  # fmt: skip


@pytest.fixture(scope="module")
def defended_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("entropy") / "store.jsonl"
    dev, test = splits()
    report = evaluate_model(tiny_estimator(trained=True), test, dev, DEFENDED, store_path=path)
    return path, report


def test_the_protocol_reports_the_defense_non_adaptive_and_adaptive(defended_run) -> None:
    _, report = defended_run
    result = report.entropy_defense
    assert result is not None and "entropy_defense" in report.timings
    worst = result.correct["adaptive worst case"]
    assert worst.mean() <= result.accuracy("non-adaptive PGD")[0]
    assert (worst <= result.correct["clean"]).all() and len(worst) == 16
    # the protocol's step is evaluate_entropy_defense itself, per sample (blocks of 8 here)
    _, (x, y) = splits()
    direct = evaluate_entropy_defense(
        tiny_estimator(trained=True), x, y, DEFENDED.threat, DIGITS, seed=0, batch_size=16
    )
    for column, values in direct.correct.items():
        np.testing.assert_array_equal(result.correct[column], values, err_msg=column)
    assert result.settings == direct.settings
    saved = json.loads(json.dumps(report.to_json()))["entropy_defense"]
    assert saved["kind"]["non-adaptive PGD"] == "non-adaptive"
    assert saved["kind"]["adaptive PGD (BPTT)"] == "adaptive"
    assert saved["kind"]["clean undefended"] == "undefended"
    assert "not an adaptive attack" in saved["non_adaptive"]["note"]
    assert saved["adaptive_worst_case"]["k"] == int(worst.sum())
    assert saved["adaptive_worst_case"]["low"] <= saved["adaptive_worst_case"]["accuracy"]
    assert saved["correct"]["adaptive worst case"] == worst.tolist()
    # it is no readout: the headline's defenses are the readouts
    assert [r.defense for r in report.robustness()] == ["final", "early", "ensemble"]
    text = markdown_report(report, "t")
    assert "## Input-entropy-reduction defense" in text and "is not adaptive" in text
    worst_row = f"| adaptive worst case | adaptive worst case | {100 * worst.mean():.1f} ["
    assert worst_row in text
    assert "adaptive worst case" in latex_table(report)


def test_a_rerun_resumes_the_defense_and_it_stays_out_of_a_plain_runs_fingerprint(
    defended_run, monkeypatch
) -> None:
    path, report = defended_run
    dev, test = splits()
    # a run without the defense has the fingerprint of a run from before the option
    assert "entropy_steps" in report.settings["fingerprint"]["config"]
    plain = dataclasses.replace(TINY, attacks="pgd", bptt=False)
    off = evaluate_model(tiny_estimator(trained=True), test, dev, plain)
    assert not any(k.startswith("entropy") for k in off.settings["fingerprint"]["config"])
    assert off.entropy_defense is None and "entropy_defense" not in off.to_json()
    assert "entropy_defense" not in off.timings

    def fail(*args, **kwargs):
        raise AssertionError("a finished step was recomputed")

    monkeypatch.setattr("deq_attacks.evaluation.protocol.evaluate_entropy_defense", fail)
    forbid_computation(monkeypatch, fail)
    again = evaluate_model(tiny_estimator(trained=True), test, dev, DEFENDED, store_path=path)
    assert again.entropy_defense is not None and report.entropy_defense is not None
    assert again.entropy_defense.to_json() == report.entropy_defense.to_json()


def test_the_defenses_settings_are_checked_before_work() -> None:
    with pytest.raises(ValueError, match="entropy_steps set but entropy_defense is off"):
        dataclasses.replace(TINY, entropy_steps=3)
    with pytest.raises(ValueError, match="entropy_eps must be in"):
        dataclasses.replace(TINY, entropy_defense=True, entropy_eps=2.0)
    dev, test = splits()
    too_few = dataclasses.replace(TINY, entropy_defense=True, entropy_every=5)
    with pytest.raises(ValueError, match="threshold 4 is below the defense's 5 solver steps"):
        evaluate_model(tiny_estimator(trained=True), test, dev, too_few)
    with pytest.raises(ValueError, match="without preprocessing"):
        evaluate_model(tiny_estimator(preprocessing=(0.2, 0.7)), test, dev, DEFENDED)
