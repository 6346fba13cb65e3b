"""The L2 threat model: the fixed-step PGD (ART's L2 PGD is the reference), the standard
AutoAttack and Square under L2 inside their eps-ball, the settings and presets, training's L2
adversary, and the whole protocol under L2 on a tiny DEQ."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescent
from attack_fixtures import assert_valid_adversarial, l2_distance
from evaluation_fixtures import AA, SQUARE, TINY, splits, tiny_estimator

from deq_attacks import Exact, Phantom, Unrolled
from deq_attacks.adversarial.pgd import l2_step, random_start
from deq_attacks.evaluation import (
    EvaluationConfig,
    SampleSeeds,
    SweepConfig,
    ThreatModel,
    benchmark,
    evaluate_model,
    fixed_step_pgd,
    markdown_report,
)
from deq_attacks.evaluation.attacks import (
    ArtAPGDCE,
    ArtAutoAttackList,
    Attack,
    DefendedModel,
    FixedStepPGD,
    Square,
    StandardAutoAttack,
    run_standard_autoattack,
)
from deq_attacks.evaluation.presets import evaluation_preset
from deq_attacks.evaluation.threat import AutoAttackSettings
from deq_attacks.training.adversary import Budget, art_classifier, pgd_attack
from deq_attacks.training.config import TrainConfig

L2 = ThreatModel(eps=0.8, step=0.3, steps=3, norm="L2")


def test_l2_pgd_equals_arts_l2_pgd_without_random_start() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    threat = dataclasses.replace(L2, random_start=False)
    ours = fixed_step_pgd(estimator, Phantom(2, 0.5), x, y, threat)
    with estimator.using(estimate=Phantom(2, 0.5)):
        art = ProjectedGradientDescent(
            estimator, norm=2, eps=0.8, eps_step=0.3, max_iter=3, num_random_init=0,
            verbose=False,
        ).generate(x, np.eye(10, dtype=np.float32)[y])  # fmt: skip
    np.testing.assert_allclose(ours, art, atol=1e-6)
    assert_valid_adversarial(ours, x, 0.8, norm="2")
    assert l2_distance(ours, x).max() > 0.7  # it moved to the boundary, not stuck at x
    assert np.abs(ours - x).max() > 0.1  # a step in L2, not an L-inf step of 0.3 / 8


def test_l2_pgd_steps_along_the_selected_estimate() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    threat = ThreatModel(eps=5.0, step=0.2, steps=1, random_start=False, norm="L2")
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for estimate, other in ((Unrolled(1, 1, 1.0), Exact()), (Exact(), Unrolled(1, 1, 1.0))):
        adv = torch.as_tensor(fixed_step_pgd(estimator, estimate, x, y, threat))
        grad = estimator.view(estimate=estimate).loss_gradient(xt, yt)
        grad_other = estimator.view(estimate=other).loss_gradient(xt, yt)
        expected = l2_step(xt, torch.as_tensor(grad), xt, 5.0, 0.2)
        torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
        assert (adv - l2_step(xt, torch.as_tensor(grad_other), xt, 5.0, 0.2)).abs().max() > 1e-3
        # an L2 step of length 0.2 wherever the clip to [0, 1] did not bite
        inside = ((xt + 0.2 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)) >= 0).all()
        if inside:
            np.testing.assert_allclose(l2_distance(adv, xt), 0.2, rtol=1e-5)


def test_l2_random_start_is_inside_the_ball_and_per_sample() -> None:
    x = np.random.default_rng(0).uniform(0, 1, (6, 1, 8, 8)).astype(np.float32)
    start = random_start(x, 0.5, SampleSeeds.first(1, "pgd", 6), "L2")
    assert_valid_adversarial(start, x, 0.5, norm="2")
    assert (l2_distance(start, x) > 0.1).all()
    again = random_start(x[3:], 0.5, SampleSeeds(1, "pgd", np.arange(3, 6)), "L2")
    np.testing.assert_array_equal(again, start[3:])


def test_l2_pgd_with_random_start_stays_in_the_ball() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    adv = fixed_step_pgd(estimator, Exact(), x, y, L2, seed=2)
    assert_valid_adversarial(adv, x, L2.eps, norm="2")


def test_l2_standard_autoattack_and_square_stay_in_their_ball() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    model = DefendedModel.of(estimator, Exact())
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    outcome = run_standard_autoattack(
        model, xt, yt, 1.0, AutoAttackSettings(3, 10, 2), 10, seeds=0, norm="L2"
    )
    assert_valid_adversarial(outcome.x_adv, x, 1.0, norm="2")
    broken = ~outcome.survived & (outcome.broken_by != "clean")
    assert broken.any()  # it attacked: some samples fell, each inside the L2 ball
    assert np.abs(outcome.x_adv - x).max() > 1.0 / 8  # larger than any L-inf 1/8-ball step
    apgd = ArtAPGDCE(steps=3).run(model, x[:4], y[:4], L2,
                                  SampleSeeds.first(0, "apgd-ce", 4)).x_adv  # fmt: skip
    assert_valid_adversarial(apgd, x[:4], L2.eps, norm="2")
    assert l2_distance(apgd, x[:4]).max() > 0.3
    # ART's L2 Square cannot run on 8x8 images (NaN): refused before any work, naming it
    with pytest.raises(ValueError, match="ART's L2 Square divides by zero"):
        ArtAutoAttackList(steps=2).run(model, x[:2], y[:2], L2, SampleSeeds.first(0, "a", 2))
    square = Square(queries=20).run(model, x, y, L2, SampleSeeds.first(0, "square", len(x)))
    assert_valid_adversarial(square.x_adv, x, L2.eps, norm="2")
    # each sample is attacked alone under L2: its result does not depend on its batch
    part = Square(queries=20).run(model, x[4:8], y[4:8], L2, SampleSeeds(0, "square",
                                  np.arange(4, 8))).x_adv  # fmt: skip
    np.testing.assert_array_equal(part, square.x_adv[4:8])


def test_norm_is_validated_and_sets_the_budget_range() -> None:
    with pytest.raises(ValueError, match="norm must be one of Linf, L2"):
        EvaluationConfig(norm="L1")
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\] under L-inf"):
        EvaluationConfig(eps=2.0)
    config = EvaluationConfig(norm="L2", eps=2.0, step=0.5, large_eps=8.0)
    assert config.threat == ThreatModel(2.0, 0.5, 10, norm="L2")
    with pytest.raises(ValueError, match="large_eps must be > 0"):
        EvaluationConfig(norm="L2", large_eps=-1.0)
    with pytest.raises(ValueError, match=r"large_eps \(0.5\) must exceed eps \(0.5\) under L2"):
        EvaluationConfig(norm="L2", eps=0.5, step=0.125)
    preset = evaluation_preset("cifar10_l2").apply(EvaluationConfig())
    assert (preset.norm, preset.eps, preset.step, preset.steps) == ("L2", 0.5, 0.125, 10)
    assert preset.attacks == "pgd,autoattack,square"  # the standard budgets
    assert evaluation_preset("cifar10_paper").apply(preset).norm == "Linf"


def test_training_adversary_runs_under_l2() -> None:
    with pytest.raises(ValueError, match="norm must be Linf or L2"):
        TrainConfig().updated(norm="L1")
    assert TrainConfig().updated(norm="L2", eps=0.5, step=0.125).threat.norm == "L2"
    estimator = tiny_estimator(trained=True)
    classifier = art_classifier(estimator.deq, (1, 8, 8), 10, torch.device("cpu"))
    attack = pgd_attack(classifier, Budget(0.5, 0.125, 2, True, "L2"), 8)
    assert attack.norm == 2


def test_protocol_runs_end_to_end_under_l2_and_says_so() -> None:
    (dev, test) = splits(n_dev=8, n_test=8)
    config = dataclasses.replace(
        TINY, norm="L2", eps=0.5, step=0.2, large_eps=4.0, attacks=f"pgd,{AA},{SQUARE},apgd-ce"
    )
    estimator = tiny_estimator(trained=True)
    report = evaluate_model(estimator, test, dev, config)
    assert report.settings["threat"]["norm"] == "L2"
    for label, column in report.columns.items():
        assert column.get("norm") == "L2", label
    text = markdown_report(report, "L2")
    threat_line = next(line for line in text.splitlines() if line.startswith("- Threat model"))
    assert "L2, eps 0.5" in threat_line and "L-inf" not in threat_line
    linf = evaluate_model(
        estimator,
        test,
        dev,
        dataclasses.replace(config, norm="Linf", eps=0.1, step=0.05, large_eps=0.5),
    )
    assert linf.settings["threat"]["norm"] == "Linf"
    # the norm came later: at its default it is left out of the store's fingerprint, so that
    # stores written before it resume; L2 is another run
    assert "norm" not in linf.settings["fingerprint"]["config"]
    assert report.settings["fingerprint"]["config"]["norm"] == "L2"


def test_benchmark_runs_under_l2() -> None:
    deq = tiny_estimator(trained=True).deq
    result = benchmark(
        deq, 6, "digits", "L2", batch_size=6, n_dev=6, steps=2,
        attacks="pgd,autoattack:iterations=2,queries=5,target_classes=2,square:queries=5",
        long_steps=3, diagnostic_samples=2, bptt=False,
        sweep=SweepConfig({"adjoint": {"n": "1", "beta": "1.0"},
                           "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}),
    )  # fmt: skip
    config = result.report.settings["config"]
    assert (config["norm"], config["eps"], config["step"], config["large_eps"]) == (
        "L2",
        0.5,
        0.125,
        8.0,
    )
    assert result.robust_accuracy <= result.clean_accuracy
    with pytest.raises(ValueError, match="its threat_model argument"):
        benchmark(deq, 6, "digits", "L2", norm="L2")


PER_SAMPLE = [
    FixedStepPGD(),
    StandardAutoAttack(iterations=3, queries=15, target_classes=2),
    Square(queries=30),
]


@pytest.mark.parametrize("attack", PER_SAMPLE, ids=["pgd", "autoattack", "square"])
def test_l2_result_of_a_sample_does_not_depend_on_its_batch(attack: Attack) -> None:
    """On a DEQ batch-invariant to the bit: a sample's L2 draws are its own. (L2 steps use the
    gradient's values, not only their signs: they agree to float rounding, not to the bit.)"""
    estimator = tiny_estimator(trained=True, batch_invariant=True)
    model = DefendedModel.of(estimator, Unrolled(1, 1, 1.0))
    (x, y), _ = splits(12, 1)
    full = attack.run(model, x, y, L2, SampleSeeds(0, "column", np.arange(12))).x_adv
    kept = np.array([1, 4, 5, 10])
    part = attack.run(model, x[kept], y[kept], L2, SampleSeeds(0, "column", kept)).x_adv
    np.testing.assert_allclose(part, full[kept], rtol=0, atol=1e-6)
    assert_valid_adversarial(full, x, L2.eps, norm="2")
    assert l2_distance(full, x).max() > 0.3
