"""The protocol's neutral model, ``DefendedModel``: what it reads from an ART front end, that its
logits and loss gradient are the estimator's, that views never change it, that it refuses an
estimator it cannot stand for before any work, and that an ART column wrapping it in a
classifier of its own attacks exactly as ART does over the estimator itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.attacks.evasion import AutoProjectedGradientDescent
from art.defences.postprocessor import ReverseSigmoid
from art.defences.preprocessor import SpatialSmoothing
from evaluation_fixtures import splits, tiny_estimator

from deq_attacks import Early, Ensemble, Exact, Final, Unrolled
from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.evaluation import SampleSeeds, ThreatModel
from deq_attacks.evaluation.attacks import ArtAPGDCE
from deq_attacks.interfaces import WhiteBoxModule

NORMALISED = {"preprocessing": (0.2, 0.7)}
THREAT = ThreatModel(eps=0.1, step=0.025, steps=4)


def batch(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    (x, y), _ = splits(n, 1)
    return x, y


def test_it_reads_the_estimators_settings_and_holds_no_art_object() -> None:
    estimator = tiny_estimator(trained=True, **NORMALISED)
    model = DefendedModel.of(estimator)
    assert model.white_box is estimator.white_box  # no view asked: the module itself
    assert (model.nb_classes, model.input_shape) == (10, (1, 8, 8))
    assert model.device == estimator.device and model.loss is estimator._loss
    assert not any(type(v).__module__.startswith("art.") for v in vars(model).values())
    assert as_defended(model) is model and as_defended(estimator).white_box is model.white_box
    with pytest.raises(TypeError, match="DefendedModel or a DEQEstimator"):
        as_defended(estimator.model)


def test_logits_and_loss_gradient_are_the_estimators_through_its_preprocessing() -> None:
    estimator = tiny_estimator(trained=True, **NORMALISED)
    x, y = batch()
    for estimate, defense in [(Exact(), Final()), (Unrolled(2, 2, 0.5), Ensemble())]:
        view = estimator.view(estimate, defense)
        model = DefendedModel.of(estimator, estimate, defense)
        with torch.no_grad():
            logits = model(torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(logits, view.predict(x), rtol=1e-5, atol=1e-6)
        grad = model.loss_gradient(torch.as_tensor(x), torch.as_tensor(y)).numpy()
        np.testing.assert_allclose(grad, view.loss_gradient(x, y), rtol=1e-5, atol=1e-7)
        assert np.abs(grad).max() > 0
    # the preprocessing is inside: without it the numbers differ
    plain = DefendedModel(estimator.white_box, 10, (1, 8, 8))
    with torch.no_grad():
        assert not torch.allclose(plain(torch.as_tensor(x)), model(torch.as_tensor(x)))


def test_views_change_nothing_of_the_model_they_come_from() -> None:
    estimator = tiny_estimator(trained=True)
    model = DefendedModel.of(estimator)
    before = (model.estimate, model.defense, model.draws, model.white_box)
    other = model.view(Unrolled(1, 1, 1.0), Early(2))
    assert (other.estimate, other.defense) == (Unrolled(1, 1, 1.0), Early(2))
    assert other.white_box is not model.white_box and other.deq is model.deq
    drawn = model.view(draws=3)
    assert drawn.white_box is model.white_box and drawn.draws == 3  # no new module
    assert (model.estimate, model.defense, model.draws, model.white_box) == before
    assert estimator.gradient_estimate == Exact() and estimator.defense == Final()


def test_an_empty_batch_and_bad_labels() -> None:
    model = DefendedModel.of(tiny_estimator())
    x = torch.zeros(0, 1, 8, 8, requires_grad=True)
    assert model(x).shape == (0, 10) and model(x).requires_grad
    x, y = batch(2)
    with pytest.raises(ValueError, match="label"):
        model.loss_gradient(torch.as_tensor(x), torch.as_tensor([3, 10]))
    with pytest.raises(TypeError, match="wraps a WhiteBoxModule"):
        DefendedModel(tiny_estimator(), 10, (1, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nb_classes must be an int >= 2"):
        DefendedModel(WhiteBoxModule(tiny_estimator().deq), 1, (1, 8, 8))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"preprocessing_defences": SpatialSmoothing(clip_values=(0.0, 1.0))}, "written in torch"),
        ({"postprocessing_defences": ReverseSigmoid()}, "postprocessing defences"),
    ],
)
def test_an_estimator_it_cannot_stand_for_is_refused_before_any_work(
    settings: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DefendedModel.of(tiny_estimator(trained=True, **settings))


def test_an_art_column_over_the_neutral_model_attacks_as_art_over_the_estimator() -> None:
    """ART's APGD-CE column wraps the defended model in a classifier of its own (the
    preprocessing inside the module); ART's APGD over the estimator itself (ART applying the
    preprocessing), seeded the same per sample, finds the same points."""
    estimator = tiny_estimator(trained=True, **NORMALISED).view(estimate=Unrolled(1, 1, 1.0))
    x, y = batch(4)
    seeds = SampleSeeds(0, "column", np.arange(4))
    column = ArtAPGDCE(steps=3).run(DefendedModel.of(estimator), x, y, THREAT, seeds).x_adv
    attack = AutoProjectedGradientDescent(
        estimator, norm=np.inf, eps=THREAT.eps, eps_step=THREAT.step, max_iter=3, batch_size=1,
        loss_type="cross_entropy", verbose=False,
    )  # fmt: skip
    labels = np.eye(10, dtype=np.float32)[y]
    by_hand = np.empty_like(x)
    for j in range(len(x)):
        np.random.seed(seeds.numpy_seed(j, "apgd_ce"))
        by_hand[j] = attack.generate(x[j : j + 1], labels[j : j + 1])[0]
    np.testing.assert_allclose(column, by_hand, rtol=0, atol=1e-6)
    assert np.abs(column - x).max() > 0 and np.abs(column - x).max() <= THREAT.eps + 1e-6


def test_evaluate_refuses_such_an_estimator_before_any_step() -> None:
    from deq_attacks.evaluation import evaluate_model

    said: list[str] = []
    dev, test = splits(4, 4)
    estimator = tiny_estimator(trained=True, postprocessing_defences=ReverseSigmoid())
    with pytest.raises(ValueError, match="postprocessing defences"):
        evaluate_model(estimator, test, dev, progress=said.append)
    assert said == []


def test_alignments_residuals_are_those_of_the_input_the_deq_receives() -> None:
    from deq_attacks.deq.convergence import last_residuals
    from deq_attacks.evaluation import gradient_alignment

    estimator = tiny_estimator(trained=True, **NORMALISED)
    x, y = batch()
    result = gradient_alignment(estimator, {"exact": Exact()}, x, y, batch_size=len(x))
    deq = estimator.deq
    with torch.no_grad():
        solved = last_residuals(deq.solve(deq.inject((torch.as_tensor(x) - 0.2) / 0.7)))
        raw = last_residuals(deq.solve(deq.inject(torch.as_tensor(x))))
    np.testing.assert_allclose(result.residuals, solved.double().numpy(), rtol=1e-6)
    assert not np.allclose(result.residuals, raw.double().numpy(), rtol=1e-3)
