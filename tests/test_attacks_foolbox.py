"""Foolbox's attacks on ``DEQFoolboxModel`` differentiate the defended logits and receive the
SELECTED gradient estimate (straight-through cotangent): proven by spy counts, by predicting
the attack's step from ``input_gradient`` alone, and by a poisoned (all-zero) estimate."""

from __future__ import annotations

import foolbox as fb
import numpy as np
import torch
from attack_fixtures import (
    SpyEstimate,
    ZeroEstimate,
    assert_sign_step_of,
    assert_valid_adversarial,
    ce_sum_cotangent,
    correct_tensor_batch,
    defended_logits,
    defended_predictions,
    digits_deq,
    direct_input_gradient,
    make_estimator,
    make_foolbox_model,
)
from torch import Tensor

from deq_attacks import Early, Exact, GradientEstimate, Unrolled
from deq_attacks.gradients import constant_cotangent

EPS = 0.1
L2_EPS = 1.5


# --- LinfPGD ---------------------------------------------------------------------------------


def test_foolbox_linf_pgd_first_step_follows_the_selected_estimate() -> None:
    """Without random start, PGD's first step is clip(x + step * sign(g)) where g is the
    selected estimate's gradient for the cotangent of summed cross-entropy at the defended
    logits; Exact and Unrolled(n=1) give different steps, each as predicted."""
    x, y = correct_tensor_batch(8)
    step = 0.02
    cot = constant_cotangent(ce_sum_cotangent(defended_logits(x), y))
    outputs: list[Tensor] = []
    for estimate in (Exact(), Unrolled(n=1, k=1)):
        attack = fb.attacks.LinfPGD(abs_stepsize=step, steps=1, random_start=False)
        raw, clipped, _ = attack(make_foolbox_model(estimate), x, y, epsilons=EPS)
        assert_sign_step_of(raw, x, step, estimate, cot)
        assert_valid_adversarial(clipped, x, EPS)
        outputs.append(raw)
    assert ((outputs[0] - outputs[1]).abs() > 1e-3).float().mean() > 0.05


def test_foolbox_linf_pgd_calls_the_estimate_once_per_step_and_judges_the_defense() -> None:
    model = digits_deq()
    x = torch.from_numpy(model.x_test[:12])
    y = torch.from_numpy(model.y_test[:12])
    spy = SpyEstimate(Exact())
    fmodel = make_foolbox_model(spy, Early(1))
    attack = fb.attacks.LinfPGD(abs_stepsize=0.03, steps=4, random_start=True)
    _, clipped, success = attack(fmodel, x, y, epsilons=EPS)
    assert len(spy.calls) == 4
    assert fmodel.white_box.backward_calls == 4
    # The cotangent is summed cross-entropy at the Early(1) logits: negative only at the label.
    assert (spy.calls[0].cotangent.argmin(1) == y).all()
    assert_valid_adversarial(clipped, x, EPS)
    after = defended_predictions(clipped, defense=Early(1))
    np.testing.assert_array_equal(success.numpy(), after != y.numpy())
    print(f"Foolbox LinfPGD-4 vs Early(1): robust accuracy {np.mean(after == y.numpy()):.2f}")


def test_foolbox_linf_pgd_with_poisoned_estimate_makes_no_progress() -> None:
    x, y = correct_tensor_batch(8)
    zero = ZeroEstimate()
    attack = fb.attacks.LinfPGD(abs_stepsize=0.03, steps=3, random_start=False)
    _, clipped, success = attack(make_foolbox_model(zero), x, y, epsilons=EPS)
    assert zero.calls == 3
    torch.testing.assert_close(clipped, x, rtol=0, atol=0)
    assert not success.any()


def test_foolbox_on_a_fresh_estimator_model_gets_the_selected_estimate() -> None:
    x, y = correct_tensor_batch(8)
    spy = SpyEstimate(Exact())
    estimator = make_estimator(spy, Early(1))
    fmodel = fb.PyTorchModel(estimator.model, bounds=(0.0, 1.0))
    attack = fb.attacks.LinfPGD(abs_stepsize=0.02, steps=1, random_start=False)
    attack(fmodel, x, y, epsilons=EPS)
    assert len(spy.calls) == 1


# --- L2CarliniWagnerAttack -------------------------------------------------------------------


def _cw(steps: int, binary_search_steps: int) -> fb.attacks.L2CarliniWagnerAttack:
    return fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=binary_search_steps,
        steps=steps,
        stepsize=0.1,
        initial_const=1.0,
        abort_early=False,
    )


def test_foolbox_cw_gets_its_margin_cotangent_through_the_selected_estimate() -> None:
    """Every Adam step of C&W calls the estimate once; the first call carries C&W's own
    cotangent const * (e_label - e_best_other) from the defended logits."""
    x, y = correct_tensor_batch(8)
    spy = SpyEstimate(Exact())
    fmodel = make_foolbox_model(spy)
    _, clipped, success = _cw(steps=5, binary_search_steps=2)(fmodel, x, y, epsilons=L2_EPS)
    assert len(spy.calls) == 2 * 5
    assert fmodel.white_box.backward_calls == 2 * 5
    logits = defended_logits(x)
    other = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    eye = torch.eye(logits.shape[1])
    expected = 1.0 * (eye[y] - eye[other])  # initial_const = 1; all margins are positive
    torch.testing.assert_close(spy.calls[0].cotangent, expected)
    assert_valid_adversarial(clipped, x, L2_EPS, norm="2")
    np.testing.assert_array_equal(success.numpy(), defended_predictions(clipped) != y.numpy())


def test_foolbox_cw_needs_the_estimate_poisoned_estimate_finds_nothing() -> None:
    """With Exact, C&W finds adversarials (raw, unbounded); with an all-zero estimate its
    iterate never leaves x, so it finds none and returns its all-zero "not found" marker."""
    x, y = correct_tensor_batch(8)
    found: dict[str, Tensor] = {}
    for name, estimate in [("exact", Exact()), ("zero", ZeroEstimate())]:
        fmodel = make_foolbox_model(estimate)
        raw, clipped, success = _cw(steps=10, binary_search_steps=2)(fmodel, x, y, epsilons=L2_EPS)
        assert_valid_adversarial(clipped, x, L2_EPS, norm="2")
        np.testing.assert_array_equal(success.numpy(), defended_predictions(clipped) != y.numpy())
        found[name] = raw.flatten(1).abs().sum(1) > 0
        if found[name].any():
            hits = found[name]
            assert (defended_predictions(raw[hits]) != y[hits].numpy()).all()
    print(
        f"Foolbox C&W found adversarials: exact {found['exact'].float().mean():.2f}, "
        f"zero {found['zero'].float().mean():.2f}"
    )
    assert not found["zero"].any()
    assert found["exact"].float().mean() >= 0.5


# --- LinfDeepFoolAttack ----------------------------------------------------------------------


def _deepfool_step(estimate: GradientEstimate, x: Tensor, overshoot: float) -> Tensor:
    """One DeepFool-Linf step towards the runner-up class, computed from ``input_gradient``."""
    logits = defended_logits(x)
    top2 = logits.argsort(1, descending=True)[:, :2]
    rows = torch.arange(len(x))
    eye = torch.eye(logits.shape[1])
    cot = constant_cotangent(eye[top2[:, 1]] - eye[top2[:, 0]])
    grad = direct_input_gradient(estimate, x, cot)
    loss = logits[rows, top2[:, 1]] - logits[rows, top2[:, 0]]
    distance = loss.abs() / (grad.flatten(1).abs().sum(1) + 1e-8) + 1e-4
    return (x + (1 + overshoot) * distance[:, None, None, None] * grad.sign()).clamp(0.0, 1.0)


def test_foolbox_deepfool_step_follows_the_selected_estimate() -> None:
    x, y = correct_tensor_batch(8)
    outputs: list[Tensor] = []
    for estimate in (Exact(), Unrolled(n=1, k=1)):
        spy = SpyEstimate(estimate)
        attack = fb.attacks.LinfDeepFoolAttack(steps=1, candidates=2, overshoot=0.02)
        raw, clipped, _ = attack(make_foolbox_model(spy), x, y, epsilons=EPS)
        assert len(spy.calls) == 1
        torch.testing.assert_close(raw, _deepfool_step(estimate, x, 0.02), rtol=1e-4, atol=1e-5)
        assert_valid_adversarial(clipped, x, EPS)
        outputs.append(raw)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_foolbox_deepfool_runs_on_the_estimate_and_judges_the_defense() -> None:
    x, y = correct_tensor_batch(8)
    spy = SpyEstimate(Exact())
    fmodel = make_foolbox_model(spy, Early(2))
    attack = fb.attacks.LinfDeepFoolAttack(steps=6, candidates=3, overshoot=0.02)
    raw, clipped, success = attack(fmodel, x, y, epsilons=EPS)
    assert len(spy.calls) >= 2
    assert fmodel.white_box.backward_calls == len(spy.calls)
    for call in spy.calls:  # DeepFool's cotangents are logit differences e_k - e_top
        cot = call.cotangent
        assert ((cot == 1).sum(1) == 1).all() and ((cot == -1).sum(1) == 1).all()
        assert (cot.abs().sum(1) == 2).all()
    assert_valid_adversarial(raw, x, None)
    assert_valid_adversarial(clipped, x, EPS)
    after = defended_predictions(clipped, defense=Early(2))
    np.testing.assert_array_equal(success.numpy(), after != y.numpy())


def test_foolbox_deepfool_with_poisoned_estimate_does_not_move() -> None:
    x, y = correct_tensor_batch(8)
    zero = ZeroEstimate()
    attack = fb.attacks.LinfDeepFoolAttack(steps=3, candidates=3, overshoot=0.02)
    raw, _, success = attack(make_foolbox_model(zero), x, y, epsilons=EPS)
    assert zero.calls == 3 * 2
    torch.testing.assert_close(raw, x, rtol=0, atol=0)
    assert not success.any()
