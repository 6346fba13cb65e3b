"""Views: a module, estimator or Foolbox model over the SAME DEQ object with its own estimate
and defense, the original untouched; and the Foolbox model's input contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_estimator_api import CLASSES, FEATURES, batch, estimator, tanh_deq
from torch import nn

from deq_attacks import (
    Adjoint,
    DEQEstimator,
    DEQFoolboxModel,
    Early,
    Ensemble,
    Exact,
    Final,
    Unrolled,
    WhiteBoxModule,
)
from deq_attacks.gradients import constant_cotangent


def test_a_module_view_shares_the_deq_and_has_its_own_settings() -> None:
    deq = tanh_deq()
    module = WhiteBoxModule(deq, Exact(), Final())
    deq.train()  # the view must not change the shared DEQ's mode
    view = module.view(estimate=Unrolled(n=2), defense=Early(3))
    assert view.deq is deq and view is not module
    assert [p for p in view.parameters()] == [p for p in module.parameters()]  # same objects
    assert all(a is b for a, b in zip(view.parameters(), deq.parameters()))
    assert (view.estimate, view.defense) == (Unrolled(n=2), Early(3))
    assert (module.estimate, module.defense) == (Exact(), Final())
    assert deq.training and not view.training
    kept = module.view(defense=Ensemble())
    assert (kept.estimate, kept.defense) == (Exact(), Ensemble())
    with pytest.raises(ValueError, match="beyond"):
        module.view(defense=Early(99))
    with pytest.raises(TypeError, match="registered ones: adjoint, adjoint_broyden"):
        module.view(estimate="exact")  # type: ignore[arg-type]
    # the view's gradient is the one using() gives on the original
    x = torch.from_numpy(batch()[0])
    ones = constant_cotangent(torch.ones(3, CLASSES, dtype=torch.float64))
    with module.using(estimate=Unrolled(n=2), defense=Early(3)):
        expected = module.input_gradient(x, ones)
    torch.testing.assert_close(view.input_gradient(x, ones), expected, rtol=0, atol=0)


def test_an_estimator_view_keeps_loss_clip_preprocessing_shape_and_classes() -> None:
    deq = tanh_deq()
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    est = estimator(
        deq,
        loss=loss,
        clip_values=(-0.5, 1.5),
        preprocessing=(0.2, 0.7),
        optimizer=torch.optim.SGD(deq.parameters(), lr=0.1),
    )
    view = est.view(estimate=Adjoint(n=3), defense=Early(2))
    assert isinstance(view, DEQEstimator) and view.deq is deq
    assert view.white_box is not est.white_box
    assert view.loss is loss and view.clip_values.tolist() == [-0.5, 1.5]
    assert view.input_shape == (FEATURES,) and view.nb_classes == CLASSES
    assert view.device == est.device and view.optimizer is None
    assert (view.gradient_estimate, view.defense) == (Adjoint(n=3), Early(2))
    assert (est.gradient_estimate, est.defense) == (Exact(), Final())
    x, y = batch()
    with est.using(estimate=Adjoint(n=3), defense=Early(2)):
        logits = est.predict(x)
        grad = est.loss_gradient(x, y)
        class_grad = est.class_gradient(x, label=1)
    np.testing.assert_array_equal(view.predict(x), logits)  # the preprocessing is applied
    np.testing.assert_allclose(view.loss_gradient(x, y), grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(view.class_gradient(x, label=1), class_grad, rtol=1e-12)
    assert not np.allclose(est.loss_gradient(x, y), grad)
    with pytest.raises(ValueError, match="outside clip_values"):
        view.predict(x + 2.0)


def test_a_foolbox_view_keeps_bounds_shape_and_preprocessing() -> None:
    deq = tanh_deq()
    preprocessing = {"mean": 0.1, "std": 0.5}
    fmodel = DEQFoolboxModel(
        deq, (0.0, 1.0), input_shape=(FEATURES,), device="cpu", preprocessing=preprocessing
    )
    view = fmodel.view(estimate=Unrolled(n=1), defense=Ensemble())
    assert view.white_box.deq is deq and view.bounds == fmodel.bounds
    assert view.input_shape == (FEATURES,) and view.device == fmodel.device
    assert (view.gradient_estimate, view.defense) == (Unrolled(n=1), Ensemble())
    assert (fmodel.gradient_estimate, fmodel.defense) == (Exact(), Final())
    x = torch.from_numpy(batch()[0])
    with fmodel.using(estimate=Unrolled(n=1), defense=Ensemble()):
        expected = fmodel(x)
    torch.testing.assert_close(view(x), expected, rtol=0, atol=0)


# --- the Foolbox model's input contract ------------------------------------------------------


def test_foolbox_model_refuses_inputs_of_another_shape_or_dtype() -> None:
    """Values pass through as foolbox.PyTorchModel passes them (attacks query outside the
    bounds and NaN: tests/test_art_foolbox_contracts.py); shape and dtype are checked."""
    fmodel = DEQFoolboxModel(tanh_deq(), (0.0, 1.0), input_shape=(FEATURES,), device="cpu")
    x = torch.from_numpy(batch()[0])
    assert fmodel(x).shape == (3, CLASSES)
    assert torch.isfinite(fmodel(x + 1.0)).all()
    with pytest.raises(ValueError, match=r"sample shape \(5,\), expected \(6,\)"):
        fmodel(x[:, :5])
    with pytest.raises(TypeError, match="floating point"):
        fmodel((x * 255).to(torch.uint8))
    assert torch.isnan(fmodel(torch.full_like(x, float("nan")))).all()
    with pytest.raises(ValueError, match="empty batch"):
        fmodel(x[:0])


def test_foolbox_model_learns_the_sample_shape_the_deq_declares() -> None:
    deq = tanh_deq()
    deq.input_shape = (FEATURES,)  # what a model built by the package declares
    fmodel = DEQFoolboxModel(deq, device="cpu")
    assert fmodel.input_shape == (FEATURES,)
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        fmodel(torch.zeros(2, 3, 2, dtype=torch.float64))
    undeclared = DEQFoolboxModel(tanh_deq(), device="cpu")
    assert undeclared.input_shape is None
    with pytest.raises(TypeError, match="floating point"):  # the dtype is still checked
        undeclared(torch.zeros(2, FEATURES, dtype=torch.int64))
