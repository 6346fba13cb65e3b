"""DEQEstimator: a DEQ as an ART PyTorchClassifier whose gradient is a chosen estimate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from deq_attacks.deq.contract import DEQModel
from deq_attacks.deq.convergence import unchecked, warn_unconverged
from deq_attacks.deq.readout import Readout
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces.inputs import (
    ClipValues,
    check_batch_size,
    check_binary_labels,
    check_images,
    check_labels,
)
from deq_attacks.interfaces.whitebox import LAYERS, WhiteBoxModule


def art_device_type(device: torch.device | str) -> str:
    """ART's ``device_type`` for a torch device: "gpu" for CUDA, "cpu" for the CPU (ART knows
    no other; anything else is refused rather than run on the CPU)."""
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"ART runs on 'cuda' or 'cpu', not {kind!r}")
    return "gpu" if kind == "cuda" else "cpu"


class DEQEstimator(PyTorchClassifier):
    """ART classifier over a DEQ, with a switchable gradient estimate and defense.

    ``predict`` classifies the defense's readout. ``loss_gradient`` is loss-aware: the loss
    is evaluated at each surrogate state of the estimate (Eq. 11, 13, 17). ``class_gradient``
    and every attack that differentiates ``estimator.model`` itself (ART's APGD and AutoAttack,
    Foolbox, torchattacks) receive the same estimate through the module's backward, with the
    incoming cotangent used straight-through. Attacks always see the DEQ in eval mode; only
    ``fit`` and ``fit_generator`` train it, and leave it in eval mode.

    Input contract (``deq_attacks.interfaces.inputs``), checked before any work: x a non-empty
    floating-point batch of ``input_shape`` samples, finite, inside ``clip_values``; labels
    class indices (N,) in [0, nb_classes) or one-hot / scores (N, nb_classes). Anything else
    (label -1, labels (N, 1), uint8 images, ...) raises; one exception, as in ART: a binary
    classifier with one logit (nb_classes 2 and ``BCEWithLogitsLoss`` or ``BCELoss``) takes
    0/1 labels (N, 1) in ``loss_gradient``, and its loss gets them as float (N, 1).
    ``clip_values`` may be per-feature arrays (broadcast to ``input_shape``). A predict call
    whose solves leave samples above ``RESIDUAL_LIMIT`` warns once, with their fraction.

    ART's conventions hold: the constructor takes ``(model, loss, input_shape, nb_classes,
    optimizer)`` positionally (``clone_for_refitting``; ``model`` may be a ``WhiteBoxModule``,
    whose estimate and defense are kept), ``layer_names`` are ``LAYERS`` (hooks fire, see
    ``WhiteBoxModule``), and a pickle round trip keeps ``model`` and ``white_box`` one object.

    Construction checks the settings against the model (one forward of one input of
    ``input_shape``): an ``input_shape`` the DEQ was not built for, ``nb_classes`` other than
    its number of outputs, ``device_type="gpu"`` without CUDA (ART would run on the CPU) are
    refused. ART's own attacks convert labels before this estimator sees them
    (``art.utils.check_and_transform_label_format`` one-hot encodes -1 as the last class):
    check labels before calling one.

    Args:
        deq: the model (or a ``WhiteBoxModule`` over it).
        loss: training and attack loss (default cross-entropy on logits).
        input_shape: shape of one input, e.g. (3, 32, 32) (required).
        nb_classes: number of classes (required).
        optimizer: for ``fit`` (and ART's trainers).
        estimate: gradient estimate (default ``Exact()``, or the module's).
        defense: readout (default the DEQ's own, usually ``Final()``, or the module's).
        clip_values: input range (default (0, 1)): floats or per-feature arrays.
        probe: run the construction probe (``view`` skips it: same model, shape and classes).
        **kwargs: passed to ``PyTorchClassifier`` (device_type, preprocessing, ...).
    """

    def __init__(
        self,
        deq: DEQModel | WhiteBoxModule,
        loss: nn.Module | None = None,
        input_shape: tuple[int, ...] | None = None,
        nb_classes: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
        clip_values: ClipValues | None = (0.0, 1.0),
        probe: bool = True,
        **kwargs: Any,
    ) -> None:
        if input_shape is None or nb_classes is None:
            raise TypeError("DEQEstimator needs input_shape and nb_classes")
        device_type = kwargs.get("device_type", "gpu")
        if device_type not in ("cpu", "gpu"):
            raise ValueError(f"device_type must be 'cpu' or 'gpu', got {device_type!r}")
        if "device_type" in kwargs and device_type == "gpu" and not torch.cuda.is_available():
            raise ValueError(
                "device_type='gpu', but torch sees no CUDA device: give device_type='cpu' "
                "(nothing falls back to the CPU silently)"
            )
        if isinstance(nb_classes, bool) or not isinstance(nb_classes, int) or nb_classes < 2:
            raise ValueError(f"nb_classes must be an int >= 2, got {nb_classes!r}")
        if isinstance(deq, WhiteBoxModule):  # ART's clone_for_refitting hands over the module
            module = deq
            module.estimate = estimate if estimate is not None else deq.estimate
            module.defense = defense if defense is not None else deq.defense
        else:
            module = WhiteBoxModule(deq, estimate, defense)
        module.eval()
        declared = getattr(module.deq, "input_shape", None)
        if declared is not None and tuple(declared) != tuple(input_shape):
            raise ValueError(
                f"input_shape {tuple(input_shape)} contradicts the DEQ's own input_shape "
                f"{tuple(declared)}"
            )
        super().__init__(
            model=module,
            loss=loss if loss is not None else nn.CrossEntropyLoss(),
            input_shape=tuple(input_shape),
            nb_classes=nb_classes,
            optimizer=optimizer,
            clip_values=clip_values,
            **kwargs,
        )
        self.white_box = module
        self._layer_names = list(LAYERS)  # the children a forward passes through
        if probe:
            self._probe()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the module itself (ART's own pickling writes a state file to disk and
        restores a shallow copy of the module beside ``white_box``): afterwards ``model`` and
        ``white_box`` are still one object, and the optimizer still holds its parameters."""
        state = self.__dict__.copy()
        for key in ("_model", "_model_wrapper", "_features"):
            state.pop(key, None)
        state["_device"] = str(self._device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._device = torch.device(state["_device"])
        self._model = self._make_model_wrapper(self.white_box)

    def _probe(self) -> None:
        """One forward of one input of ``input_shape`` (the middle of the clip range): the model
        must take it and return (1, nb_classes) logits (or (1, 1) for a binary classifier with
        a BCE loss); else one ValueError names the problem."""
        clip = self.clip_values  # floats or per-feature arrays
        low, high = (0.0, 1.0) if clip is None else (clip[0], clip[1])
        middle = (np.asarray(low, dtype=np.float64) + np.asarray(high, dtype=np.float64)) / 2
        param = next(self.deq.parameters(), None)
        dtype = torch.empty(0, dtype=param.dtype if param is not None else torch.float32)
        x = np.broadcast_to(middle, (1, *self.input_shape)).astype(dtype.numpy().dtype)
        try:
            with unchecked():  # an untrained model's probe may not converge: not a run's forward
                logits = self.predict(x)
        except Exception as error:  # any failure of the model on this shape: say which
            raise ValueError(
                f"the DEQ does not run on one input of input_shape {tuple(self.input_shape)}: "
                f"{type(error).__name__}: {error}"
            ) from None
        outputs: tuple[int, ...] = (self.nb_classes,)
        if self.nb_classes == 2 and isinstance(self._loss, (nn.BCELoss, nn.BCEWithLogitsLoss)):
            outputs = (1, 2)  # a binary classifier may give one logit, as in ART
        if logits.shape[0] != 1 or logits.shape[1:] not in [(k,) for k in outputs]:
            raise ValueError(
                f"nb_classes is {self.nb_classes}, but the DEQ returns logits of shape "
                f"{tuple(logits.shape[1:])} per input"
            )

    @property
    def deq(self) -> DEQModel:
        return self.white_box.deq

    @property
    def gradient_estimate(self) -> GradientEstimate:
        """The estimate every gradient of this estimator comes from; settable."""
        return self.white_box.estimate

    @gradient_estimate.setter
    def gradient_estimate(self, value: GradientEstimate) -> None:
        self.white_box.estimate = value

    @property
    def defense(self) -> Readout:
        """The readout that ``predict`` classifies; settable."""
        return self.white_box.defense

    @defense.setter
    def defense(self, value: Readout) -> None:
        self.white_box.defense = value

    def view(
        self,
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
    ) -> DEQEstimator:
        """A new estimator over a view of this one's module (``WhiteBoxModule.view``: the same
        DEQ object, no parameter copied) with its own estimate and defense (None: this one's),
        and this one's loss, clip values, preprocessing and defences, device, input shape and
        classes; without an optimizer (a view attacks and predicts; it does not train). This
        estimator is not changed."""
        module = self.white_box.view(estimate, defense)
        return DEQEstimator(  # the same model, shape and classes: probed already
            module,  # the view itself: one module per view
            input_shape=tuple(self.input_shape),
            nb_classes=self.nb_classes,
            estimate=module.estimate,
            defense=module.defense,
            loss=self._loss,
            clip_values=self.clip_values,
            channels_first=self.channels_first,
            preprocessing_defences=self.preprocessing_defences,
            postprocessing_defences=self.postprocessing_defences,
            preprocessing=self.preprocessing,
            device_type=art_device_type(self._device),
            probe=False,
        )

    @contextmanager
    def using(
        self, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> Iterator[DEQEstimator]:
        """Temporarily switch the estimate and/or the defense of this estimator (a convenience
        for interactive use; code that must not change a shared estimator uses ``view``)."""
        with self.white_box.using(estimate, defense):
            yield self

    def _check_x(self, x: np.ndarray | torch.Tensor) -> None:
        clip = self.clip_values
        check_images(x, tuple(self.input_shape), None if clip is None else (clip[0], clip[1]))

    def _loss_labels(self, y: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
        """The labels a loss receives: class indices (``check_labels``), or, for a binary
        classifier with one logit (nb_classes 2 and a BCE loss, as ART tells them apart),
        0/1 labels as float (N, 1), from labels (N, 1), (N,) or one-hot (N, 2)."""
        if self.nb_classes == 2 and isinstance(self._loss, (nn.BCELoss, nn.BCEWithLogitsLoss)):
            if y.ndim == 2 and y.shape[1] == 1:
                return check_binary_labels(y, n)
            return check_labels(y, n, 2).float().unsqueeze(1)
        return check_labels(y, n, self.nb_classes)

    def get_activations(  # type: ignore[override]
        self,
        x: np.ndarray | torch.Tensor,
        layer: int | str | None = None,
        batch_size: int = 128,
        framework: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """ART's ``get_activations`` for a layer of ``layer_names`` (``LAYERS``: the fixed
        point, the defended readout state, the defended logits), by name or index; with
        ``framework=True`` a tensor whose gradient w.r.t. x is the selected estimate's."""
        if isinstance(layer, str) and layer not in self._layer_names:
            raise ValueError(f"unknown layer {layer!r}: choose from {self._layer_names}")
        if isinstance(layer, int) and not -len(LAYERS) <= layer < len(LAYERS):
            raise ValueError(f"layer index {layer} outside [0, {len(LAYERS)}): {LAYERS}")
        return super().get_activations(x, layer, batch_size=batch_size, framework=framework)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 128,
        nb_epochs: int = 10,
        **kwargs: Any,
    ) -> None:
        """ART's ``fit`` on the DEQ's training forward; afterwards the module is back in eval
        mode."""
        check_batch_size(batch_size)
        self._check_x(x)
        check_labels(y, len(x), self.nb_classes)
        try:
            with self.white_box.fitting():
                super().fit(x, y, batch_size=batch_size, nb_epochs=nb_epochs, **kwargs)
        finally:
            self.white_box.eval()

    def fit_generator(self, generator: Any, nb_epochs: int = 20, **kwargs: Any) -> None:
        """ART's ``fit_generator`` on the DEQ's training forward; afterwards the module is back
        in eval mode, as after ``fit``."""
        try:
            with self.white_box.fitting():
                super().fit_generator(generator, nb_epochs=nb_epochs, **kwargs)
        finally:
            self.white_box.eval()

    def class_gradient(
        self,
        x: np.ndarray | torch.Tensor,
        label: Any = None,
        training_mode: bool = False,
        **kwargs: Any,
    ) -> np.ndarray:
        """ART's ``class_gradient`` through the module's backward (the selected estimate)."""
        self._refuse_training_mode(training_mode, "class_gradient")
        self._check_x(x)
        return super().class_gradient(x, label=label, training_mode=False, **kwargs)

    @staticmethod
    def _refuse_training_mode(training_mode: bool, method: str) -> None:
        if training_mode:
            raise ValueError(
                f"{method}(training_mode=True) is not supported: attacks and predictions always "
                "use the DEQ in eval mode with the selected estimate and defense; train with "
                "fit() or the DEQ itself"
            )

    def predict(
        self, x: np.ndarray, batch_size: int = 128, training_mode: bool = False, **kwargs: Any
    ) -> np.ndarray:
        """Defended logits (N, nb_classes) as float32, in batches; warns once per call if some
        samples ended their solve above the residual limit."""
        self._refuse_training_mode(training_mode, "predict")
        check_batch_size(batch_size)
        self._check_x(x)
        x_pre, _ = self._apply_preprocessing(x, y=None, fit=False)
        x_tensor = x_pre if isinstance(x_pre, torch.Tensor) else torch.from_numpy(x_pre)
        outputs, residuals = [], []
        with torch.no_grad():
            for start in range(0, len(x_tensor), batch_size):
                batch = x_tensor[start : start + batch_size].to(self._device)
                logits, res = self.white_box.defended(batch)
                outputs.append(logits.cpu().numpy().astype(np.float32))
                residuals.append(res.cpu())
        if self.white_box.reads_fixed_point:
            warn_unconverged(torch.cat(residuals), stacklevel=3)  # the caller of predict
        return self._apply_postprocessing(preds=np.concatenate(outputs), fit=False)

    def compute_loss(
        self,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        reduction: str = "none",
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """ART's ``compute_loss`` of the defended logits, with the input contract checked
        first: labels class indices in [0, nb_classes) or one-hot vectors (ART alone would
        one-hot encode label -1 as the last class)."""
        self._check_x(x)
        check_labels(y, len(x), self.nb_classes)
        return super().compute_loss(x, y, reduction=reduction, **kwargs)

    def loss_gradient(
        self,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        training_mode: bool = False,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """dL/dx by the selected estimate, with the loss evaluated at its surrogate states.

        Accepts numpy arrays or torch tensors (returned in kind), labels as indices (N,) or
        one-hot (N, nb_classes). The labels travel with this call's forward, not on the module.
        """
        self._refuse_training_mode(training_mode, "loss_gradient")
        self._check_x(x)
        labels = self._loss_labels(y, len(x)).to(self._device)
        if self.all_framework_preprocessing:
            x_t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(x)
            with torch.enable_grad():
                x_grad = x_t.to(self._device).requires_grad_()
                inputs, _ = self._apply_preprocessing(x_grad, y=None, fit=False, no_grad=False)
        elif isinstance(x, np.ndarray):
            x_pre, _ = self._apply_preprocessing(x, y=None, fit=False, no_grad=True)
            x_grad = inputs = torch.from_numpy(x_pre).to(self._device)
        else:
            raise NotImplementedError(
                "torch inputs need preprocessing written in torch (ART's framework preprocessing)"
            )
        # the estimate alone: a loss-aware gradient never reads the defended logits
        grad = self.white_box.loss_gradient(inputs, self._loss, labels)
        if inputs is not x_grad:  # back through the torch preprocessing
            (grad,) = torch.autograd.grad(inputs, x_grad, grad)
        if isinstance(x, torch.Tensor):
            return grad
        grads = grad.cpu().numpy().copy()
        if not self.all_framework_preprocessing:
            grads = self._apply_preprocessing_gradient(x, grads)
        return grads
