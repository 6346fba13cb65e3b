"""The transfer column: APGD on a surrogate (the DEQ unrolled as an explicit network, or a
user's model), scored on every defense."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch
from evaluation_fixtures import TINY, TRANSFER, splits, tiny_deq_weights, tiny_estimator

from deq_attacks import BackpropThroughSolver, DEQEstimator, FixedPointIteration
from deq_attacks.evaluation import EvaluationConfig, SampleSeeds, ThreatModel, evaluate_model
from deq_attacks.evaluation.attacks import DefendedModel, TransferAPGD, UnrolledSurrogate
from deq_attacks.evaluation.settings import Mode
from deq_attacks.models import mlp_deq

THREAT = ThreatModel(eps=0.1, step=0.05, steps=2)


def unrolled_deq(threshold: int = 4) -> DEQEstimator:
    """The tiny trained MLP DEQ whose forward is exactly ``threshold`` plain fixed-point steps,
    one more f (the implicit gradient's Final readout is f(z*)) and the head (no stopping, no
    best-iterate choice): unrolled to ``threshold + 1`` steps it is the model itself."""
    deq = mlp_deq(
        64, 10, hidden=16,
        solver=FixedPointIteration(threshold=threshold, tol=0.0, return_best=False),
    )  # fmt: skip
    deq.load_state_dict(tiny_deq_weights())
    return DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=10)


def test_the_unrolled_surrogate_is_the_model_when_the_solver_is_plain_iteration() -> None:
    estimator = unrolled_deq()
    _, (x, _) = splits()
    xt = torch.as_tensor(x)
    with torch.no_grad():
        model = DefendedModel.of(estimator)
        defended = model(xt)
        assert torch.allclose(UnrolledSurrogate(model, 5)(xt), defended, atol=1e-6)
        assert not torch.allclose(UnrolledSurrogate(model, 1)(xt), defended, atol=1e-3)


def test_transfer_from_the_model_itself_breaks_what_white_box_apgd_breaks() -> None:
    estimator = unrolled_deq()
    _, (x, y) = splits(n_test=16)
    seeds = SampleSeeds.first(0, "transfer", len(x))
    model = DefendedModel.of(estimator)
    white_box = DefendedModel.of(estimator, BackpropThroughSolver())
    crafted = TransferAPGD(depth=5, iterations=10).run(model, x, y, THREAT, seeds).x_adv
    reference = TransferAPGD(white_box, iterations=10).run(model, x, y, THREAT, seeds).x_adv
    assert np.abs(crafted - x).max() <= THREAT.eps + 1e-6
    assert crafted.min() >= 0 and crafted.max() <= 1
    np.testing.assert_allclose(crafted, reference, atol=1e-5)
    broken = estimator.predict(crafted).argmax(1) != y
    assert broken.sum() >= 4  # the check has something to compare
    np.testing.assert_array_equal(broken, estimator.predict(reference).argmax(1) != y)
    # a surrogate that is not the model (one step deep) transfers worse on the same samples
    weak = TransferAPGD(depth=1, iterations=10).run(model, x, y, THREAT, seeds).x_adv
    assert (estimator.predict(weak).argmax(1) != y).sum() < broken.sum()


def test_a_users_surrogate_by_name_and_the_column_in_the_protocol() -> None:
    estimator = unrolled_deq()
    module = types.ModuleType("my_surrogates")
    module.unrolled = lambda est: UnrolledSurrogate(est, 5)  # type: ignore[attr-defined]
    sys.modules["my_surrogates"] = module
    try:
        config = dataclasses.replace(
            TINY, attacks=f"pgd,{TRANSFER},surrogate=my_surrogates:unrolled", bptt=False
        )
        dev, test = splits(n_dev=8, n_test=8)
        report = evaluate_model(estimator, test, dev, config)
    finally:
        del sys.modules["my_surrogates"]
    assert report.columns["transfer"]["surrogate"] == "my_surrogates:unrolled"
    for defense in report.defenses:
        assert len(report.survived[defense]["transfer"]) == len(test[0])
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        TransferAPGD("deq_attacks:nothing").model_for(DefendedModel.of(estimator))
    with pytest.raises(ValueError, match="transfer depth is for the unrolled surrogate"):
        EvaluationConfig(attacks="pgd,transfer:surrogate=a:b,depth=3")


def test_the_transfer_column_runs_in_cascade_mode_after_the_gradient_columns() -> None:
    config = dataclasses.replace(TINY, attacks=f"pgd,{TRANSFER}", bptt=False, mode=Mode.CASCADE)
    dev, test = splits(n_dev=8, n_test=16)
    report = evaluate_model(unrolled_deq(), test, dev, config)
    order = report.order["final"]
    assert order[-1] == "transfer" and all(label.endswith(" PGD") for label in order[:-1])
    cells = report.survived["final"]["transfer"]
    assert len(cells) == 16 and any(v is not None for v in cells)


def test_a_samples_transfer_example_does_not_depend_on_its_batch() -> None:
    estimator = tiny_estimator(trained=True, batch_invariant=True)
    _, (x, y) = splits(n_test=8)
    seeds = SampleSeeds.first(0, "transfer", len(x))
    attack = TransferAPGD(iterations=5)
    model = DefendedModel.of(estimator)
    together = attack.run(model, x, y, THREAT, seeds).x_adv
    rows = np.array([5, 2])
    apart = attack.run(model, x[rows], y[rows], THREAT, seeds.subset(rows)).x_adv
    np.testing.assert_array_equal(apart, together[rows])
    assert not np.array_equal(together[2], together[5])
