"""ART's and Foolbox's own contracts, each checked against the library's reference wrapper
(``PyTorchClassifier`` / ``foolbox.PyTorchModel``) around the same module: refitting clones,
named-layer activations and their gradients, pickling, per-feature clip values, a one-logit
binary classifier, and attack queries outside the bounds or NaN."""

from __future__ import annotations

import pickle

import foolbox as fb
import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from attack_fixtures import INPUT_SHAPE, NUM_CLASSES, correct_batch, digits_deq, make_estimator
from test_estimator_api import FEATURES, batch, tanh_deq
from torch import nn

from deq_attacks import (
    Broyden,
    DEQEstimator,
    DEQFoolboxModel,
    Early,
    Ensemble,
    Exact,
    Final,
    Unrolled,
    WhiteBoxModule,
)
from deq_attacks.models import small_conv_deq

pytestmark = pytest.mark.filterwarnings("ignore::deq_attacks.deq.convergence.NotConvergedWarning")


def reference(est: DEQEstimator, **kwargs: object) -> PyTorchClassifier:
    """ART's own classifier around the same module, loss, shape and classes."""
    return PyTorchClassifier(
        est.white_box, est._loss, tuple(est.input_shape), est.nb_classes, **kwargs
    )


def trainable_estimator() -> DEQEstimator:
    deq = small_conv_deq(in_channels=1, num_classes=NUM_CLASSES, channels=4, image_size=8)
    return DEQEstimator(
        deq,
        input_shape=INPUT_SHAPE,
        nb_classes=NUM_CLASSES,
        estimate=Unrolled(n=2, k=1, lam=1.0),
        defense=Early(2),
        optimizer=torch.optim.Adam(deq.parameters(), lr=1e-3),
    )


# --- clone_for_refitting ---------------------------------------------------------------------


def test_clone_for_refitting_as_pytorch_classifier_does() -> None:
    est = trainable_estimator()
    x, y = correct_batch(6)
    ref_clone = reference(est, optimizer=est._optimizer).clone_for_refitting()
    clone = est.clone_for_refitting()  # ART: type(self)(model, loss, input_shape, nb_classes, ...)
    assert type(clone) is DEQEstimator and type(ref_clone) is PyTorchClassifier
    assert clone.white_box is not est.white_box and clone.deq is not est.deq
    assert clone.gradient_estimate == est.gradient_estimate and clone.defense == est.defense
    assert clone.input_shape == est.input_shape and clone.nb_classes == est.nb_classes
    # fresh weights, its own optimizer over them, and it trains
    before = [p.detach().clone() for p in clone.deq.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, est.deq.parameters(), strict=True))
    clone.fit(x, y, batch_size=6, nb_epochs=1)
    after = list(clone.deq.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert clone.predict(x).shape == ref_clone.predict(x).shape == (6, NUM_CLASSES)


def test_constructor_takes_arts_positional_arguments() -> None:
    deq = digits_deq().deq
    est = DEQEstimator(deq, nn.CrossEntropyLoss(), INPUT_SHAPE, NUM_CLASSES)
    assert est.input_shape == INPUT_SHAPE and est.nb_classes == NUM_CLASSES
    with pytest.raises(TypeError, match="input_shape and nb_classes"):
        DEQEstimator(deq)


# --- named layers: activations and their gradients -------------------------------------------


@pytest.mark.parametrize("defense", [Final(), Ensemble(), Early(2)], ids=repr)
def test_activations_of_every_layer_as_pytorch_classifier_reads_them(defense: object) -> None:
    est = make_estimator(defense=defense)  # type: ignore[arg-type]
    x, _ = correct_batch(5)
    assert est.layer_names == ["fixed_point", "readout", "logits"]
    ref = reference(est, clip_values=(0.0, 1.0))
    deq = est.deq
    with torch.no_grad():
        inj = deq.inject(torch.from_numpy(x))
        trajectory = deq.solve(inj, keep=True)
        readout = est.defense.state(deq, trajectory, inj).numpy()
        final = Final().state(deq, trajectory, inj).numpy()
    expected = {"fixed_point": final, "readout": readout, "logits": est.predict(x)}
    for index, name in enumerate(est.layer_names):
        ours = est.get_activations(x, index, batch_size=2)
        assert isinstance(ours, np.ndarray) and ours.shape[0] == 5
        # batches of 2 against one of 5: float32 convolutions round per batch size
        np.testing.assert_allclose(ours, est.get_activations(x, name), rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours, ref.get_activations(x, name, batch_size=2), atol=0)
        np.testing.assert_allclose(ours, expected[name], rtol=1e-5, atol=1e-6)
    if not isinstance(defense, Final):  # the defended readout is another state than z*
        assert np.abs(expected["readout"] - expected["fixed_point"]).max() > 1e-3
    with pytest.raises(ValueError, match="unknown layer 'deq'"):
        est.get_activations(x, "deq")


def test_layer_gradient_is_the_estimates_against_finite_differences() -> None:
    """custom_loss_gradient on the fixed point of a converged float64 DEQ (Exact estimate)
    equals central differences, and equals PyTorchClassifier's on the same module."""
    tight = Broyden(threshold=60, tol=1e-12)
    deq = tanh_deq(tight)
    est = DEQEstimator(deq, input_shape=(FEATURES,), nb_classes=4, estimate=Exact(tight))
    ref = reference(est, clip_values=(0.0, 1.0))
    x, _ = batch()
    target = np.random.default_rng(3).random(x.shape)

    def loss(diff: torch.Tensor, p: int) -> torch.Tensor:
        return diff.norm(p=p)

    ours = est.custom_loss_gradient(loss, x, target, "fixed_point")
    theirs = ref.custom_loss_gradient(loss, x, target, "fixed_point")
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)

    def value(x_: np.ndarray) -> float:
        a = est.get_activations(x_, "fixed_point") - est.get_activations(target, "fixed_point")
        return float(np.linalg.norm(a))

    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (value(up) - value(down)) / (2 * h)
    np.testing.assert_allclose(ours, fd, rtol=1e-4, atol=1e-6)
    assert np.abs(ours).max() > 1e-3


# --- pickle ------------------------------------------------------------------------------------


def test_pickle_round_trip_keeps_one_module_and_fits() -> None:
    est = trainable_estimator()
    x, y = correct_batch(4)
    before = est.predict(x)
    ref_before = reference(est).predict(x)
    ref_copy = pickle.loads(pickle.dumps(reference(est)))
    copy = pickle.loads(pickle.dumps(est))
    assert copy.model is copy.white_box  # ART's own: a shallow copy beside it
    np.testing.assert_allclose(copy.predict(x), before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref_copy.predict(x), ref_before, rtol=1e-6, atol=1e-6)
    copy.defense = Final()
    assert copy.model.defense == Final()
    with torch.no_grad():
        module_logits = copy.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(copy.predict(x), module_logits, rtol=1e-6, atol=1e-6)
    params = list(copy.deq.parameters())
    assert all(
        p is q for p, q in zip(params, copy._optimizer.param_groups[0]["params"], strict=True)
    )
    start = [p.detach().clone() for p in params]
    copy.fit(x, y, batch_size=4, nb_epochs=1)
    assert any(not torch.equal(a, b) for a, b in zip(start, params, strict=True))


# --- per-feature clip values -------------------------------------------------------------------


def test_per_feature_clip_values_in_predict_and_pgd() -> None:
    """On a converged DEQ (float32 tanh, Exact at z*) ART's PGD takes the same steps through
    ours as through PyTorchClassifier, inside per-feature bounds."""
    tight = Broyden(threshold=60, tol=1e-6)
    deq = tanh_deq(tight).float()
    x64, y = batch()
    x = x64.astype(np.float32)
    low = np.zeros(FEATURES, dtype=np.float32)
    high = np.maximum(x.max(0), 0.6).astype(np.float32)  # tighter than 1 where x allows
    est = DEQEstimator(
        deq, input_shape=(FEATURES,), nb_classes=4, estimate=Exact(tight), clip_values=(low, high)
    )
    ref = reference(est, clip_values=(low, high))
    np.testing.assert_allclose(est.predict(x), ref.predict(x), rtol=1e-5, atol=1e-6)
    kwargs = dict(eps=0.3, eps_step=0.1, max_iter=3, num_random_init=0, verbose=False)
    ours = ProjectedGradientDescent(est, **kwargs).generate(x, y=y)
    theirs = ProjectedGradientDescent(ref, **kwargs).generate(x, y=y)
    assert (ours >= low).all() and (ours <= high).all()
    assert np.isclose(ours, high).sum() > np.isclose(np.minimum(x + 0.3, 1), high).sum()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    outside = x.copy()
    outside[0, np.argmin(high)] = high.min() + 0.1
    with pytest.raises(ValueError, match="per-feature clip_values"):
        est.predict(outside)


# --- a binary classifier with one logit -----------------------------------------------------


def test_binary_one_logit_classifier_in_pgd() -> None:
    torch.manual_seed(0)
    tight = Broyden(threshold=40, tol=1e-7)
    deq = small_conv_deq(in_channels=1, num_classes=1, channels=4, image_size=8, solver=tight)
    x, digits = correct_batch(6)
    y = (digits % 2).reshape(-1, 1).astype(np.float32)  # (N, 1): odd digit or not
    est = DEQEstimator(deq, nn.BCEWithLogitsLoss(), INPUT_SHAPE, 2, estimate=Exact(tight))
    ref = reference(est, clip_values=(0.0, 1.0))
    np.testing.assert_allclose(
        est.loss_gradient(x, y), ref.loss_gradient(x, y), rtol=1e-4, atol=1e-7
    )
    # ART's PGD one-hot encodes (N, 1) to (N, 2); ours hands the loss 0/1 labels (N, 1)
    # (ART 1.20's own classifier then gives BCE labels (N,) and stops: not compared here)
    kwargs = dict(eps=0.1, eps_step=0.05, max_iter=2, num_random_init=0, verbose=False)
    ours = ProjectedGradientDescent(est, **kwargs).generate(x, y=y)
    step = np.clip(x + 0.05 * np.sign(est.loss_gradient(x, y)), 0, 1)
    first = ProjectedGradientDescent(est, **{**kwargs, "max_iter": 1}).generate(x, y=y)
    np.testing.assert_allclose(first, step, rtol=0, atol=1e-6)
    assert np.abs(ours - x).max() > 0.05
    with pytest.raises(ValueError, match="must be 0 or 1"):
        est.loss_gradient(x, y + 2)
    # the strict contract stays for a multi-class classifier
    with pytest.raises(ValueError, match=r"squeeze it to \(N,\)"):
        make_estimator().loss_gradient(x, digits.reshape(-1, 1))


# --- Foolbox queries outside the bounds or NaN ------------------------------------------------


def test_foolbox_queries_pass_through_as_pytorch_model() -> None:
    deq = digits_deq().deq
    ours = DEQFoolboxModel(deq, bounds=(0.0, 1.0), device="cpu")
    theirs = fb.PyTorchModel(WhiteBoxModule(deq).eval(), bounds=(0.0, 1.0), device="cpu")
    x, y = correct_batch(3)
    xt = torch.from_numpy(x)
    hair = xt.clone()
    hair[:, 0, 0, 0] = 1.001  # EAD and VirtualAdversarial step a hair outside
    nan = xt.clone()
    nan[1] = float("nan")  # BoundaryAttack's candidates
    torch.testing.assert_close(ours(hair), theirs(hair))
    # NaN rows: NaN logits, as a plain module gives them; the DEQ's own inject refuses NaN
    # (so foolbox.PyTorchModel around the module stops), and the other rows are unchanged
    with pytest.raises(ValueError, match="NaN"):
        theirs(nan)
    answer = ours(nan)
    assert torch.isnan(answer[1]).all() and torch.isfinite(answer[[0, 2]]).all()
    torch.testing.assert_close(answer[[0, 2]], theirs(xt[[0, 2]]))
    assert torch.isnan(ours(torch.full_like(xt, float("nan")))).all()
    with pytest.raises(TypeError, match="floating point"):
        ours((xt * 255).to(torch.uint8))
    # Foolbox's EAD runs on ours as on theirs
    attack = fb.attacks.EADAttack(binary_search_steps=1, steps=5, initial_const=10.0)
    _, adv_ours, ok_ours = attack(ours, xt, torch.from_numpy(y), epsilons=None)
    _, adv_theirs, ok_theirs = attack(theirs, xt, torch.from_numpy(y), epsilons=None)
    torch.testing.assert_close(adv_ours, adv_theirs)
    assert torch.equal(ok_ours, ok_theirs)
