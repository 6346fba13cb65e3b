"""DEQEstimator: a DEQ as an ART PyTorchClassifier whose gradient is a chosen estimate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from deq_attacks.deq.model import DEQ
from deq_attacks.deq.readout import Readout
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces.whitebox import WhiteBoxModule


class DEQEstimator(PyTorchClassifier):
    """ART classifier over a DEQ, with a switchable gradient estimate and defense.

    ``predict`` classifies the defense's readout. ``loss_gradient`` is loss-aware: the loss
    is evaluated at each surrogate state of the estimate (Eq. 11, 13, 17). ``class_gradient``
    and every attack that differentiates ``estimator.model`` itself (ART's APGD and AutoAttack,
    Foolbox, torchattacks) receive the same estimate through the module's backward, with the
    incoming cotangent used straight-through.

    Args:
        deq: the model.
        estimate: gradient estimate (default ``Exact()``).
        defense: readout (default the DEQ's own, usually ``Final()``).
        input_shape: shape of one input, e.g. (3, 32, 32).
        nb_classes: number of classes.
        loss: training and attack loss (default cross-entropy on logits).
        optimizer: for ``fit`` (and ART's trainers).
        clip_values: input range (default (0, 1)).
        **kwargs: passed to ``PyTorchClassifier`` (device_type, preprocessing, ...).
    """

    def __init__(
        self,
        deq: DEQ,
        *,
        input_shape: tuple[int, ...],
        nb_classes: int,
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
        loss: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        clip_values: tuple[float, float] | None = (0.0, 1.0),
        **kwargs: Any,
    ) -> None:
        module = WhiteBoxModule(deq, estimate, defense).eval()
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

    @property
    def deq(self) -> DEQ:
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

    @contextmanager
    def using(
        self, estimate: GradientEstimate | None = None, defense: Readout | None = None
    ) -> Iterator[DEQEstimator]:
        """Temporarily switch the estimate and/or the defense."""
        with self.white_box.using(estimate, defense):
            yield self

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 128,
        nb_epochs: int = 10,
        **kwargs: Any,
    ) -> None:
        """ART's ``fit``; afterwards the module is back in eval mode, so that libraries which
        differentiate ``estimator.model`` without calling ``eval()`` get the selected estimate."""
        try:
            super().fit(x, y, batch_size=batch_size, nb_epochs=nb_epochs, **kwargs)
        finally:
            self.white_box.eval()

    def _check_input(self, x: np.ndarray | torch.Tensor) -> None:
        shape = tuple(x.shape[1:])
        if shape != tuple(self.input_shape):
            raise ValueError(
                f"x has sample shape {shape}, expected {tuple(self.input_shape)} (batch first)"
            )

    def predict(
        self, x: np.ndarray, batch_size: int = 128, training_mode: bool = False, **kwargs: Any
    ) -> np.ndarray:
        self._check_input(x)
        return super().predict(x, batch_size=batch_size, training_mode=training_mode, **kwargs)

    def loss_gradient(
        self,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        training_mode: bool = False,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """dL/dx by the selected estimate, with the loss evaluated at its surrogate states.

        Accepts numpy arrays or torch tensors (returned in kind), labels as indices or one-hot.
        """
        self._check_input(x)
        if y.ndim == 1:  # class indices: ART's own path expects one-hot labels
            y = (
                torch.nn.functional.one_hot(y.long(), self.nb_classes).float()
                if isinstance(y, torch.Tensor)
                else np.eye(self.nb_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]
            )
        labels = self.reduce_labels(y)
        labels_t = (
            labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
        )
        labels_t = labels_t.to(self._device).long()
        with self.white_box.loss_aware(self._loss, labels_t):
            return super().loss_gradient(x, y, training_mode=training_mode, **kwargs)
