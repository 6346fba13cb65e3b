"""The input contract of DEQEstimator: every bad input raises before any work, the residual
warning fires once per call, training leaves the module in eval mode, and which forward an
attack gets does not hang on ``module.training`` (the torchattacks trap)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchattacks
from art.attacks.evasion import ProjectedGradientDescent
from art.data_generators import PyTorchDataGenerator
from attack_fixtures import SpyEstimate, correct_tensor_batch, defended_logits, make_estimator
from test_estimator_api import CLASSES, FEATURES, batch, estimator, one_hot, tanh_deq
from torch import nn

from deq_attacks import Broyden, DEQEstimator, Early, Exact, Unrolled
from deq_attacks.deq.convergence import RESIDUAL_LIMIT, NotConvergedWarning

Call = Callable[[DEQEstimator, object, object], object]

CALLS: dict[str, Call] = {
    "predict": lambda est, x, y: est.predict(x),
    "loss_gradient": lambda est, x, y: est.loss_gradient(x, y),
    "fit": lambda est, x, y: est.fit(x, y, batch_size=2, nb_epochs=1),
}


def trainable_estimator(**kwargs: object) -> DEQEstimator:
    deq = tanh_deq()
    return estimator(deq, optimizer=torch.optim.SGD(deq.parameters(), lr=0.1), **kwargs)


def _untouched(est: DEQEstimator) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in est.deq.state_dict().items()}


def _assert_same(est: DEQEstimator, before: dict[str, torch.Tensor]) -> None:
    after = est.deq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["loss_gradient", "fit"])
def test_label_minus_one_is_refused_not_wrapped_to_the_last_class(call: str) -> None:
    est = trainable_estimator()
    x, _ = batch()
    before = _untouched(est)
    with pytest.raises(ValueError, match=r"label -1 is outside \[0, 4\)"):
        CALLS[call](est, x, np.array([0, -1, 2]))
    _assert_same(est, before)


@pytest.mark.parametrize("call", ["loss_gradient", "fit"])
def test_labels_of_shape_n_by_1_are_refused_not_read_as_class_0(call: str) -> None:
    est = trainable_estimator()
    x, y = batch()
    with pytest.raises(ValueError, match=r"labels have shape \(3, 1\).*squeeze"):
        CALLS[call](est, x, y[:, None])


class LabelSpy(DEQEstimator):
    """Records the labels that ART hands to ``loss_gradient``."""

    seen: list[np.ndarray]

    def loss_gradient(self, x: object, y: object, **kwargs: object) -> object:
        labels = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        self.seen.append(labels.copy())
        return super().loss_gradient(x, y, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "art_hands_over"),
    [
        ([0, -1, 2], [0, 3, 2]),  # -1 becomes the last class (numpy's negative index)
        ([[0], [3], [2]], [0, 3, 2]),  # (N, 1) is squeezed
        ([0.0, 1.7, 2.0], [0, 1, 2]),  # 1.7 is truncated to class 1
    ],
)
def test_what_arts_attacks_do_to_labels_before_our_code_sees_them(
    given: list[object], art_hands_over: list[int]
) -> None:
    """ART's attacks convert labels with ``check_and_transform_label_format`` before calling
    ``loss_gradient``: by then a label -1, a (N, 1) array or a float label is a valid one-hot
    label, so no check of ours can see it. Our own entry points refuse the raw forms (tests
    above); through ART, check labels before calling ``generate`` (docs/quickstart.md)."""
    est = LabelSpy(tanh_deq().float(), input_shape=(FEATURES,), nb_classes=CLASSES)
    est.seen = []
    x = batch()[0].astype(np.float32)
    attack = ProjectedGradientDescent(
        est, eps=0.1, eps_step=0.05, max_iter=1, num_random_init=0, verbose=False
    )
    attack.generate(x, np.array(given))
    (labels,) = est.seen
    np.testing.assert_array_equal(labels, np.eye(CLASSES)[art_hands_over])  # one-hot floats
    with pytest.raises(ValueError):  # the same raw labels, given to us directly
        est.loss_gradient(x, np.array(given))
    with pytest.raises(IndexError):  # a label beyond the classes fails inside ART, unclearly
        attack.generate(x, np.array([0, 1, CLASSES]))


def test_label_beyond_the_classes_and_wrong_count_are_refused() -> None:
    est = trainable_estimator()
    x, _ = batch()
    with pytest.raises(ValueError, match=r"label 4 is outside \[0, 4\)"):
        est.loss_gradient(x, np.array([0, 1, CLASSES]))
    with pytest.raises(ValueError, match="2 labels for 3 inputs"):
        est.loss_gradient(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="integral"):
        est.loss_gradient(x, np.array([0.0, 1.5, 2.0]))


def test_index_and_one_hot_labels_give_the_same_gradient() -> None:
    est = trainable_estimator()
    x, y = batch()
    np.testing.assert_array_equal(est.loss_gradient(x, y), est.loss_gradient(x, one_hot(y)))


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_integer_images_are_refused_not_classified_unscaled(call: str, dtype: type) -> None:
    est = trainable_estimator()
    _, y = batch()
    x = np.full((3, FEATURES), 200, dtype=dtype)
    with pytest.raises(TypeError, match=f"dtype {np.dtype(dtype).name}.*floating point"):
        CALLS[call](est, x, y)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_inputs_outside_clip_values_are_refused_before_attacking(call: str) -> None:
    est = trainable_estimator()
    x, y = batch()
    x[1, 2] = 1.5
    with pytest.raises(ValueError, match=r"spans \[.*, 1\.5\], outside clip_values \[0, 1\]"):
        CALLS[call](est, x, y)


def test_clip_check_follows_the_estimators_clip_values() -> None:
    x, y = batch()
    wide = trainable_estimator(clip_values=(-2.0, 2.0))
    assert wide.loss_gradient(1.5 * x, y).shape == x.shape
    assert trainable_estimator(clip_values=None).predict(3.0 * x).shape == (3, CLASSES)


def test_torch_inputs_outside_clip_values_are_refused() -> None:
    est = trainable_estimator()
    x, y = batch()
    with pytest.raises(ValueError, match="outside clip_values"):
        est.loss_gradient(torch.from_numpy(x) - 0.5, torch.from_numpy(y))


@pytest.mark.parametrize("call", sorted(CALLS))
def test_empty_batch_is_a_clear_error(call: str) -> None:
    est = trainable_estimator()
    with pytest.raises(ValueError, match=r"empty batch \(0 samples\)"):
        CALLS[call](est, np.zeros((0, FEATURES)), np.zeros(0, dtype=np.int64))


def test_nan_inputs_are_refused() -> None:
    est = trainable_estimator()
    x, y = batch()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        est.predict(x)


# --- residual warning -------------------------------------------------------------------------


def test_unconverged_solve_warns_once_per_call_with_the_fraction() -> None:
    est = estimator(tanh_deq(solver=Broyden(threshold=1)))
    x, _ = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.predict(x, batch_size=1)  # three solves, one call
    messages = [str(w.message) for w in caught if issubclass(w.category, NotConvergedWarning)]
    assert len(messages) == 1
    residuals = est.deq.relative_residuals()[:, -1]
    assert (residuals > RESIDUAL_LIMIT).all()  # the last batch's sample is above the limit
    assert messages[0].startswith("3 of 3 samples (100.0%)")


def test_converged_solve_does_not_warn() -> None:
    est = estimator(tanh_deq(solver=Broyden(threshold=30, tol=1e-10)))
    x, _ = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)
        est.predict(x)


# --- training mode ----------------------------------------------------------------------------


def test_fit_generator_leaves_the_module_in_eval_mode_and_trains() -> None:
    est = trainable_estimator()
    x, y = batch()
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(one_hot(y)))
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    before = _untouched(est)
    est.fit_generator(PyTorchDataGenerator(loader, size=3, batch_size=3), nb_epochs=2)
    assert not est.model.training and not est.deq.training
    after = est.deq.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fit_leaves_the_module_in_eval_mode() -> None:
    est = trainable_estimator()
    x, y = batch()
    est.fit(x, y, batch_size=3, nb_epochs=1)
    assert not est.model.training and not est.deq.training


@pytest.mark.parametrize("method", ["loss_gradient", "predict", "class_gradient"])
def test_training_mode_true_is_refused_not_a_silent_switch_of_the_estimate(method: str) -> None:
    est = trainable_estimator(estimate=Unrolled(n=2))
    x, y = batch()
    calls: dict[str, Callable[[], object]] = {
        "loss_gradient": lambda: est.loss_gradient(x, y, training_mode=True),
        "predict": lambda: est.predict(x, training_mode=True),
        "class_gradient": lambda: est.class_gradient(x, label=0, training_mode=True),
    }
    with pytest.raises(ValueError, match=r"training_mode=True\) is not supported"):
        calls[method]()


def test_training_mode_of_the_module_does_not_change_what_attacks_get() -> None:
    est = trainable_estimator(estimate=Unrolled(n=2), defense=Early(2))
    x, y = batch()
    eval_grad = est.loss_gradient(x, y)
    eval_logits = est.model(torch.from_numpy(x))
    est.model.train()  # as any library may do
    torch.testing.assert_close(est.model(torch.from_numpy(x)), eval_logits, rtol=0, atol=0)
    assert est.deq.training
    np.testing.assert_array_equal(est.loss_gradient(x, y), eval_grad)


# --- the torchattacks trap --------------------------------------------------------------------


def test_torchattacks_on_a_sequential_wrapper_keeps_the_selected_estimate_and_defense() -> None:
    """torchattacks restores the train mode of the nn.Sequential it was handed, which leaves
    estimator.model in train mode; the module must still return the Early(2) logits and its
    backward must still call the selected estimate."""
    x, y = correct_tensor_batch(8)
    spy = SpyEstimate(Exact())
    est = make_estimator(spy, Early(2))
    wrapped = nn.Sequential(est.model)
    torchattacks.FGSM(wrapped, eps=0.1)(x, y)
    assert len(spy.calls) == 1
    assert est.model.training  # the trap: the library left the module in train mode

    x_leaf = x.clone().requires_grad_()
    logits = est.model(x_leaf)
    torch.testing.assert_close(logits.detach(), defended_logits(x, Early(2)), rtol=0, atol=0)
    final = defended_logits(x)
    assert (logits.detach() - final).abs().max() > 1e-3  # Early(2) differs from Final
    nn.functional.cross_entropy(logits, y).backward()
    assert len(spy.calls) == 2
    assert x_leaf.grad is not None and x_leaf.grad.abs().sum() > 0

    torchattacks.FGSM(wrapped, eps=0.1)(x, y)  # again, now starting from train mode
    assert len(spy.calls) == 3


def test_normalisation_as_art_preprocessing_is_differentiated_through() -> None:
    mean, std = 0.3, 0.2  # ART keeps them as float32: agreement to ~1e-8 relative
    deq = tanh_deq()
    plain = estimator(deq, clip_values=None)
    normalising = estimator(deq, preprocessing=(mean, std))
    x, y = batch()
    want = plain.loss_gradient((x - mean) / std, y) / std
    np.testing.assert_allclose(normalising.loss_gradient(x, y), want, rtol=1e-6, atol=1e-12)
    got_t = normalising.loss_gradient(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(normalising.predict(x), plain.predict((x - mean) / std), rtol=1e-6)


def test_arts_device_type_comes_from_one_mapping() -> None:
    from deq_attacks.interfaces import art_device_type

    assert art_device_type("cpu") == "cpu" and art_device_type(torch.device("cpu")) == "cpu"
    assert art_device_type("cuda") == "gpu" and art_device_type(torch.device("cuda", 1)) == "gpu"
    with pytest.raises(ValueError, match="ART runs on 'cuda' or 'cpu', not 'meta'"):
        art_device_type("meta")
