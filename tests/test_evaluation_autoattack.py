"""The standard AutoAttack (pyautoattack) receives the selected estimate through the model of
the column's estimator view and records each of its four attacks per sample; ART's AutoAttack
list is a separate attack whose ``steps`` take effect."""

from __future__ import annotations

from dataclasses import asdict
from functools import cache

import numpy as np
import torch
from attack_fixtures import (
    SpyEstimate,
    ZeroEstimate,
    check_taps,
    correct_batch,
    make_estimator,
    tap_gradients,
)

from deq_attacks import Exact, Unrolled
from deq_attacks.evaluation import AutoAttackSettings, SampleSeeds, ThreatModel
from deq_attacks.evaluation.attacks import ArtAutoAttackList, DefendedModel, StandardAutoAttack
from deq_attacks.evaluation.attacks.autoattack import build_standard
from deq_attacks.evaluation.threat import STANDARD_ATTACKS

THREAT = ThreatModel(eps=0.1, step=0.025, steps=3)
SMALL = AutoAttackSettings(iterations=3, queries=10, target_classes=2)


@cache
def spied_run():
    spy = SpyEstimate(Unrolled(n=1, k=1, lam=1.0))
    view = DefendedModel.of(make_estimator(), spy)
    taps = tap_gradients(view.white_box)
    x, y = correct_batch(6)
    attack = StandardAutoAttack(**asdict(SMALL))
    out = attack.run(view, x, y, THREAT, SampleSeeds.first(0, "aa", len(x)))
    return spy, taps, x, y, out.x_adv, out.extras


def test_autoattack_receives_the_selected_estimate() -> None:
    spy, taps, *_ = spied_run()
    assert len(spy.calls) > 0
    recorded = check_taps(taps, Unrolled(n=1, k=1, lam=1.0), Exact())
    assert recorded == len(spy.calls)


def test_poisoned_estimate_reaches_autoattack(monkeypatch) -> None:
    exact_calls = []
    original = Exact.injection_gradient
    monkeypatch.setattr(
        Exact,
        "injection_gradient",
        lambda self, *a: exact_calls.append(1) or original(self, *a),
    )
    zero = ZeroEstimate()
    x, y = correct_batch(4)
    view = DefendedModel.of(make_estimator(), zero)
    StandardAutoAttack(**asdict(SMALL)).run(view, x, y, THREAT, SampleSeeds.first(0, "aa", len(x)))
    assert zero.calls > 0 and exact_calls == []


def test_robust_never_exceeds_any_of_the_four_attacks() -> None:
    *_, x, y, x_adv, extras = spied_run()
    after = [extras[f"after/{name}"] for name in STANDARD_ATTACKS]
    survived = after[-1]
    for flags in after:
        assert not (survived & ~flags).any()
    for earlier, later in zip(after, after[1:]):
        assert not (later & ~earlier).any()  # a cascade: a broken sample stays broken
    broken_by = extras["broken_by"]
    assert ((broken_by == "") == survived).all()
    for i, name in enumerate(broken_by):
        if name:
            k = STANDARD_ATTACKS.index(name)
            assert not after[k][i] and (k == 0 or after[k - 1][i])
    assert np.abs(x_adv - x).max() <= THREAT.eps + 1e-6
    with torch.no_grad():
        pred = make_estimator().predict(x_adv).argmax(1)
    assert ((pred == y) == survived).all()


def test_standard_settings_and_reduced_ones_are_applied() -> None:
    model = make_estimator().model
    standard = build_standard(model, 8 / 255, AutoAttackSettings(), 10, 0, "cpu")
    assert AutoAttackSettings().standard and not SMALL.standard
    assert tuple(standard.attacks_to_run) == STANDARD_ATTACKS
    assert standard.apgd.n_iter == standard.apgd_targeted.n_iter == standard.fab.n_iter == 100
    assert standard.apgd_targeted.n_target_classes == standard.fab.n_target_classes == 9
    assert standard.square.n_queries == 5000 and standard.apgd.n_restarts == 1
    reduced = build_standard(model, 8 / 255, SMALL, 10, 0, "cpu")
    assert reduced.apgd.n_iter == reduced.apgd_targeted.n_iter == reduced.fab.n_iter == 3
    assert reduced.apgd.n_iter_2 == 1 and reduced.square.n_queries == 10
    assert reduced.fab.n_target_classes == 2
    assert SMALL.describe()["standard"] is False


def test_art_autoattack_is_its_own_attack_and_honours_steps() -> None:
    estimator = make_estimator()
    attack = ArtAutoAttackList(steps=2).build(estimator, THREAT)
    iterations = [a.max_iter for a in attack.attacks]
    assert iterations[:3] == [2, 2, 2] and attack.attacks[3].max_iter == 100
    default = ArtAutoAttackList().build(estimator, THREAT)
    assert [a.max_iter for a in default.attacks][:2] == [100, 100]
    assert ArtAutoAttackList.name == "art_autoattack" and StandardAutoAttack.name == "autoattack"


def test_the_documented_pyautoattack_call_runs_on_a_view_and_uses_its_estimate() -> None:
    """docs/autoattack.md's own call of the installed pyautoattack against
    ``estimator.view(...).model`` (APGD-CE alone, few iterations): it returns ``(x_adv,
    y_adv)`` within eps and [0, 1], every backward goes through the selected estimate, and
    its success is judged on the defended logits."""
    from pyautoattack import AutoAttack

    spy = SpyEstimate(Unrolled(n=1, k=1, lam=1.0))
    model = make_estimator().view(estimate=spy).model
    x_np, y_np = correct_batch(6)
    x_test, y_test = torch.as_tensor(x_np), torch.as_tensor(y_np)
    adversary = AutoAttack(model, norm="Linf", eps=0.1, version="custom", attacks=["apgd-ce"],
                           seed=0, device="cpu")  # fmt: skip
    adversary.apgd.n_iter = 3
    x_adv, y_adv = adversary.run_standard_evaluation(x_test, y_test, batch_size=6)
    assert len(spy.calls) > 0
    assert (x_adv - x_test).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() <= x_adv.max() <= 1
    with torch.no_grad():
        defended = make_estimator().predict(x_adv.numpy()).argmax(1)
    np.testing.assert_array_equal(defended, y_adv.numpy())
