"""ART's attacks attack the SELECTED gradient estimate of a DEQ (DESIGN.md, "Two kinds of
consumer").

ART's PGD calls ``DEQEstimator.loss_gradient`` (loss-aware path); APGD and AutoAttack build a new
``PyTorchClassifier`` over ``estimator.model`` and differentiate it (autograd path); Square
only queries predictions. Each test proves where the gradient came from: a spy estimate counts
the calls, gradients are recomputed with ``input_gradient`` alone, and a poisoned (all-zero)
estimate stops gradient attacks but not the query attack.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from art.attacks.evasion import (
    AutoAttack,
    AutoProjectedGradientDescent,
    ProjectedGradientDescent,
    SquareAttack,
)
from art.estimators.classification import PyTorchClassifier
from attack_fixtures import (
    SpyEstimate,
    ZeroEstimate,
    assert_valid_adversarial,
    correct_batch,
    defended_logits,
    defended_predictions,
    digits_deq,
    direct_input_gradient,
    make_estimator,
)
from torch import nn

from deq_attacks import Early, Exact, Final, GradientEstimate, Readout, Unrolled
from deq_attacks.gradients import constant_cotangent, loss_cotangent

EPS = 0.1


def _record_loss_gradient(
    estimator: PyTorchClassifier,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Wrap ``estimator.loss_gradient`` (on the instance) to record (x, y, returned gradient)."""
    records: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    original = estimator.loss_gradient

    def recording(x: Any, y: Any, **kwargs: Any) -> Any:
        grad = original(x, y, **kwargs)
        records.append((np.array(x, copy=True), np.array(y, copy=True), np.array(grad, copy=True)))
        return grad

    estimator.loss_gradient = recording  # type: ignore[method-assign]
    return records


def _art_loss_cotangent(
    art_estimator: PyTorchClassifier, x: np.ndarray, y: np.ndarray, defense: Readout
) -> torch.Tensor:
    """dL/dlogits (B, classes) of ``art_estimator``'s own loss at the defended logits, with
    the labels prepared as its ``loss_gradient`` prepares them."""
    labels = torch.as_tensor(np.asarray(art_estimator.reduce_labels(y)))
    logits = defended_logits(x, defense).requires_grad_()
    (grad,) = torch.autograd.grad(art_estimator._loss(logits, labels), logits)
    return grad


def test_fit_through_deq_estimator_trains_on_real_digits() -> None:
    """ART's fit loop over DEQEstimator trains the fixture (held-out accuracy)."""
    model = digits_deq()
    print(
        f"fixture: clean held-out accuracy {model.clean_accuracy:.3f}, "
        f"fit {model.train_seconds:.1f} s"
    )
    assert model.clean_accuracy >= 0.85


# --- ProjectedGradientDescent: the loss-aware path ----------------------------------------


def test_art_pgd_calls_selected_estimate_once_per_step_with_loss_aware_cotangent() -> None:
    x, y = correct_batch(8)
    spy = SpyEstimate(Exact())
    estimator = make_estimator(spy)
    attack = ProjectedGradientDescent(
        estimator,
        eps=EPS,
        eps_step=0.02,
        max_iter=3,
        num_random_init=0,
        batch_size=8,
        verbose=False,
    )
    adv = attack.generate(x, y)
    assert len(spy.calls) == 3
    assert estimator.white_box.backward_calls == 3
    assert_valid_adversarial(adv, x, EPS)
    # Loss-aware: the first cotangent is d(mean CE)/dlogits at the head of z* (not a
    # straight-through constant from the defended logits f(z*)).
    deq = estimator.deq
    with torch.no_grad():
        injection = deq.inject(torch.from_numpy(x))
        z_star = deq.solve(injection).final
        logits = deq.logits(z_star, injection)
    onehot = nn.functional.one_hot(torch.from_numpy(y), 10).float()
    expected = (torch.softmax(logits, 1) - onehot) / len(x)
    torch.testing.assert_close(spy.calls[0].cotangent, expected, rtol=1e-4, atol=1e-6)


def test_art_pgd_step_is_sign_of_the_selected_estimate() -> None:
    """One PGD step equals clip(x + step * sign(g)) with g computed directly by
    ``input_gradient`` for the selected estimate; switching the estimate changes the step
    exactly as the direct computation predicts."""
    x, y = correct_batch(8)
    step = 0.01
    results: dict[str, np.ndarray] = {}
    for name, estimate in [("exact", Exact()), ("unrolled", Unrolled(n=1, k=1))]:
        attack = ProjectedGradientDescent(
            make_estimator(estimate),
            eps=EPS,
            eps_step=step,
            max_iter=1,
            num_random_init=0,
            batch_size=8,
            verbose=False,
        )
        adv = attack.generate(x, y)
        grad = direct_input_gradient(
            estimate, x, loss_cotangent(nn.CrossEntropyLoss(), torch.from_numpy(y))
        ).numpy()
        decided = np.abs(grad) > 1e-6 * np.abs(grad).max()  # signs clear of float noise
        assert decided.mean() > 0.9
        predicted = np.clip(x + step * np.sign(grad), 0.0, 1.0)
        np.testing.assert_allclose(adv[decided], predicted[decided], atol=1e-6)
        assert_valid_adversarial(adv, x, EPS)
        results[name] = adv
    changed = np.abs(results["exact"] - results["unrolled"]) > 1e-3
    assert changed.mean() > 0.05, "Exact and Unrolled(n=1) should move different pixels"


def test_art_pgd_with_poisoned_estimate_makes_no_progress() -> None:
    x, y = correct_batch(8)
    zero = ZeroEstimate()
    attack = ProjectedGradientDescent(
        make_estimator(zero),
        eps=EPS,
        eps_step=0.02,
        max_iter=4,
        num_random_init=0,
        batch_size=8,
        verbose=False,
    )
    adv = attack.generate(x, y)
    assert zero.calls == 4
    np.testing.assert_array_equal(adv, x)


def test_art_pgd_labels_and_success_come_from_the_defense(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With y=None, PGD labels by ``estimator.predict`` under the defense (Early(1) here) and
    reports its success rate on the defended output."""
    model = digits_deq()
    x_all = model.x_test
    early = defended_predictions(x_all, defense=Early(1))
    final = defended_predictions(x_all)
    disagree = np.flatnonzero(early != final)[:4]
    agree = np.flatnonzero(early == final)[:8]
    assert disagree.size >= 1
    x = x_all[np.concatenate([disagree, agree])]
    spy = SpyEstimate(Exact())
    estimator = make_estimator(spy, Early(1))
    attack = ProjectedGradientDescent(
        estimator,
        eps=EPS,
        eps_step=0.02,
        max_iter=2,
        num_random_init=0,
        batch_size=16,
        verbose=False,
    )
    with caplog.at_level(logging.INFO, logger="art.attacks.evasion.projected_gradient_descent"):
        adv = attack.generate(x)
    labels = defended_predictions(x, defense=Early(1))
    seen = spy.calls[0].cotangent.argmin(1).numpy()  # softmax - onehot is negative at the label
    np.testing.assert_array_equal(seen, labels)
    assert (seen != defended_predictions(x)).any()
    rates = [r.getMessage() for r in caplog.records if "Success rate" in r.getMessage()]
    assert rates, "ART PGD did not log its success rate"
    reported = float(rates[-1].split(":")[-1].strip().rstrip("%"))
    fooled = defended_predictions(adv, defense=Early(1)) != labels
    assert reported == pytest.approx(100 * fooled.mean(), abs=0.01)
    assert_valid_adversarial(adv, x, EPS)


# --- AutoProjectedGradientDescent: the autograd path ---------------------------------------


def _check_recorded_gradients(
    records: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    art_estimator: PyTorchClassifier,
    estimate: GradientEstimate,
    other: GradientEstimate,
    defense: Readout,
) -> None:
    """Each recorded gradient equals the selected estimate's ``input_gradient`` for the
    attack's own loss cotangent at the defended logits (straight-through), and not the other
    estimate's."""
    for x_k, y_k, grad in records:
        cot = constant_cotangent(_art_loss_cotangent(art_estimator, x_k, y_k, defense))
        expected = direct_input_gradient(estimate, x_k, cot).numpy()
        alternative = direct_input_gradient(other, x_k, cot).numpy()
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * scale)
        assert np.abs(grad - alternative).max() > 1e-2 * scale


@pytest.mark.parametrize("loss_type", ["cross_entropy", "difference_logits_ratio"])
def test_art_apgd_differentiates_the_module_through_the_selected_estimate(
    loss_type: str,
) -> None:
    x, y = correct_batch(8)
    spy = SpyEstimate(Exact())
    estimator = make_estimator(spy)
    ours = _record_loss_gradient(estimator)
    attack = AutoProjectedGradientDescent(
        estimator,
        eps=EPS,
        eps_step=0.03,
        max_iter=4,
        nb_random_init=1,
        batch_size=8,
        loss_type=loss_type,
        verbose=False,
    )
    assert attack.estimator is not estimator
    assert attack.estimator.model is estimator.white_box
    theirs = _record_loss_gradient(attack.estimator)
    adv = attack.generate(x, y)
    assert ours == [], "APGD was expected to bypass DEQEstimator.loss_gradient"
    assert len(theirs) == 4
    assert len(spy.calls) == 4
    assert estimator.white_box.backward_calls == 4
    _check_recorded_gradients(theirs, attack.estimator, Exact(), Unrolled(n=1, k=1), Final())
    assert_valid_adversarial(adv, x, EPS)


def test_art_apgd_first_step_with_poisoned_estimate_stays_at_its_random_start() -> None:
    """APGD's first step is x_1 = P(x_0 + eta * sign(grad)): with an all-zero estimate it
    stays at the random start x_0. (Later iterates may still move, by APGD's momentum along
    x_k - x_init after a step-size checkpoint, which is not gradient information.)"""
    x, y = correct_batch(8)
    zero = ZeroEstimate()
    attack = AutoProjectedGradientDescent(
        make_estimator(zero),
        eps=EPS,
        eps_step=0.03,
        max_iter=4,
        nb_random_init=1,
        batch_size=8,
        loss_type="cross_entropy",
        verbose=False,
    )
    visited: list[np.ndarray] = []
    original = attack.estimator.compute_loss

    def recording(x: np.ndarray, y: np.ndarray, **kwargs: Any) -> np.ndarray:
        visited.append(np.array(x, copy=True))
        return original(x, y, **kwargs)

    attack.estimator.compute_loss = recording  # type: ignore[method-assign]
    adv = attack.generate(x, y)
    assert zero.calls == 4
    assert len(visited) == 4 + 1  # f(x_0), f(x_1), then one per later iteration
    assert np.abs(visited[0] - x).max() > 0  # the random start
    np.testing.assert_allclose(visited[1], visited[0], atol=1e-7)
    assert_valid_adversarial(adv, x, EPS)


# --- SquareAttack: query-based, no gradient --------------------------------------------------


def test_art_square_ignores_the_gradient_estimate() -> None:
    """Square never calls a gradient; with a poisoned estimate it still fools the DEQ, and the
    same seed gives the same examples as with the Exact estimate."""
    x, y = correct_batch(12)
    eps = 0.3
    outputs: list[np.ndarray] = []
    for estimate in (ZeroEstimate(), Exact()):
        estimator = make_estimator(estimate)
        attack = SquareAttack(
            estimator,
            eps=eps,
            max_iter=40,
            p_init=0.8,
            nb_restarts=1,
            batch_size=16,
            verbose=False,
        )
        np.random.seed(0)
        adv = attack.generate(x, y)
        assert estimator.white_box.backward_calls == 0
        assert_valid_adversarial(adv, x, eps)
        outputs.append(adv)
    zero_adv, exact_adv = outputs
    np.testing.assert_array_equal(zero_adv, exact_adv)
    fooled = defended_predictions(zero_adv) != y
    print(f"Square (40 queries, eps {eps}) with a zero gradient: fooled {fooled.mean():.2f}")
    assert fooled.any()


# --- AutoAttack: APGD-CE, APGD-DLR and Square through ART's AutoAttack class ----------------


def test_art_autoattack_uses_selected_estimate_and_judges_the_defense() -> None:
    model = digits_deq()
    defense = Early(1)
    wrong = np.flatnonzero(defended_predictions(model.x_test, defense=defense) != model.y_test)
    assert wrong.size >= 2
    chosen = np.concatenate([wrong[:2], np.setdiff1d(np.arange(12), wrong[:2])[:10]])
    x, y = model.x_test[chosen], model.y_test[chosen]
    spy = SpyEstimate(Exact())
    estimator = make_estimator(spy, defense)
    iters = 3
    apgd = [
        AutoProjectedGradientDescent(
            estimator,
            eps=EPS,
            eps_step=0.03,
            max_iter=iters,
            nb_random_init=1,
            batch_size=16,
            loss_type=loss,
            verbose=False,
        )
        for loss in ("cross_entropy", "difference_logits_ratio")
    ]
    square = SquareAttack(estimator, eps=EPS, max_iter=20, nb_restarts=1, verbose=False)
    records = [_record_loss_gradient(a.estimator) for a in apgd]
    attack = AutoAttack(estimator, eps=EPS, eps_step=0.03, attacks=[*apgd, square], batch_size=16)
    np.random.seed(0)
    adv = attack.generate(x, y)

    assert_valid_adversarial(adv, x, EPS)
    ran = [len(r) // iters for r in records]
    assert ran[0] == 1, "APGD-CE should have run once (some digits start correct)"
    assert [len(r) for r in records] == [iters * k for k in ran]
    assert len(spy.calls) == sum(len(r) for r in records)
    assert estimator.white_box.backward_calls == len(spy.calls)
    for attack_records, a in zip(records, apgd):
        _check_recorded_gradients(
            attack_records[:1], a.estimator, Exact(), Unrolled(n=1, k=1), defense
        )

    # Success is judged on the defended output (Early(1)), as estimator.predict gives it.
    clean = defended_predictions(x, defense=defense)
    after = defended_predictions(adv, defense=defense)
    best = attack.best_attacks
    np.testing.assert_array_equal(best == AutoAttack.SAMPLE_MISCLASSIFIED, clean != y)
    assert (clean != y).sum() == 2
    np.testing.assert_array_equal(best == AutoAttack.SAMPLE_DEFAULT, (clean == y) & (after == y))
    assert (after[best >= 0] != y[best >= 0]).all()
    np.testing.assert_array_equal(estimator.predict(adv).argmax(1), after)
    for a in apgd:
        np.testing.assert_array_equal(a.estimator.predict(adv).argmax(1), after)
    print(
        f"AutoAttack (reduced) vs Early(1): clean {np.mean(clean == y):.2f}, "
        f"robust {np.mean(after == y):.2f}, best attacks {best.tolist()}"
    )
