"""torchattacks on the WhiteBoxModule (eval mode) differentiate the defended logits and receive
the SELECTED gradient estimate: proven by predicting PGD's step from ``input_gradient`` alone,
by a spy estimate, by taps on every backward through the module, and by a poisoned estimate."""

from __future__ import annotations

import numpy as np
import torch
import torchattacks
from attack_fixtures import (
    SpyEstimate,
    ZeroEstimate,
    assert_sign_step_of,
    assert_valid_adversarial,
    ce_sum_cotangent,
    check_taps,
    correct_tensor_batch,
    defended_logits,
    defended_predictions,
    digits_deq,
    make_estimator,
    make_white_box,
    tap_gradients,
)
from torch import Tensor

from deq_attacks import Early, Exact, Unrolled
from deq_attacks.gradients import constant_cotangent

EPS = 0.1


def test_torchattacks_pgd_first_step_follows_the_selected_estimate() -> None:
    """Without random start, PGD's first step is clip(x + alpha * sign(g)), g the selected
    estimate's gradient for cross-entropy at the defended logits; Exact and Unrolled(n=1) give
    different steps, each as predicted."""
    x, y = correct_tensor_batch(8)
    alpha = 0.02
    cot = constant_cotangent(ce_sum_cotangent(defended_logits(x), y))
    outputs: list[Tensor] = []
    for estimate in (Exact(), Unrolled(n=1, k=1)):
        module = make_white_box(estimate)
        adv = torchattacks.PGD(module, eps=EPS, alpha=alpha, steps=1, random_start=False)(x, y)
        assert not module.training
        assert_sign_step_of(adv, x, alpha, estimate, cot)
        assert_valid_adversarial(adv, x, EPS)
        outputs.append(adv)
    assert ((outputs[0] - outputs[1]).abs() > 1e-3).float().mean() > 0.05


def test_torchattacks_pgd_every_step_gets_the_selected_estimate() -> None:
    """On ``estimator.model``, with random start and 4 steps: 4 calls of the estimate, and
    every gradient that reached the input equals the selected estimate's for the attack's own
    cotangent at the defended (Early(2)) logits."""
    x, y = correct_tensor_batch(8)
    spy = SpyEstimate(Exact())
    module = make_estimator(spy, Early(2)).model  # torchattacks puts it in eval mode itself
    taps = tap_gradients(module)
    adv = torchattacks.PGD(module, eps=EPS, alpha=0.03, steps=4, random_start=True)(x, y)
    assert len(spy.calls) == 4
    assert module.backward_calls == 4
    assert check_taps(taps, Exact(), Unrolled(n=1, k=1)) == 4
    assert_valid_adversarial(adv, x, EPS)


def test_torchattacks_pgd_with_poisoned_estimate_makes_no_progress() -> None:
    x, y = correct_tensor_batch(8)
    zero = ZeroEstimate()
    adv = torchattacks.PGD(make_white_box(zero), eps=EPS, alpha=0.03, steps=3, random_start=False)(
        x, y
    )
    assert zero.calls == 3
    torch.testing.assert_close(adv, x, rtol=0, atol=0)


def _autoattack(module: torch.nn.Module, eps: float) -> torchattacks.AutoAttack:
    """torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), shortened."""
    attack = torchattacks.AutoAttack(module, norm="Linf", eps=eps, version="standard", seed=0)
    apgd, apgdt, fab, square = attack._autoattack.attacks
    assert isinstance(apgd, torchattacks.APGD) and isinstance(apgdt, torchattacks.APGDT)
    assert isinstance(fab, torchattacks.FAB) and isinstance(square, torchattacks.Square)
    for gradient_attack in (apgd, apgdt, fab):
        gradient_attack.steps = 3
    apgdt.n_target_classes = 2
    fab.n_target_classes = 2
    square.n_queries = 30
    return attack


def test_torchattacks_autoattack_uses_the_selected_estimate_and_judges_the_defense() -> None:
    model = digits_deq()
    x = torch.from_numpy(model.x_test[:10])
    y = torch.from_numpy(model.y_test[:10])
    defense = Early(1)
    spy = SpyEstimate(Exact())
    module = make_white_box(spy, defense)
    taps = tap_gradients(module)
    adv = _autoattack(module, EPS)(x, y)
    assert not module.training
    assert_valid_adversarial(adv, x, EPS)
    assert len(spy.calls) > 0
    assert module.backward_calls == len(spy.calls)
    assert check_taps(taps, Exact(), Unrolled(n=1, k=1), limit=6) == len(spy.calls)
    # MultiAttack keeps an attack's example only where the defended output is wrong.
    clean = defended_predictions(x, defense=defense)
    after = defended_predictions(adv, defense=defense)
    changed = (adv != x).flatten(1).any(1).numpy()
    y_np = y.numpy()
    assert (after[changed] != y_np[changed]).all()
    np.testing.assert_array_equal(after[~changed], clean[~changed])
    print(
        f"torchattacks AutoAttack (reduced) vs Early(1): clean {np.mean(clean == y_np):.2f}, "
        f"robust {np.mean(after == y_np):.2f}, backward calls {len(spy.calls)}"
    )
