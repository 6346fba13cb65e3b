"""The defended model that every attack of the package receives: a ``WhiteBoxModule`` (its
estimate and defense fixed) behind a torch preprocessing, as a torch module (inputs in [0, 1]
to the defended logits) and a loss-aware gradient (the PGD's), with what an attack needs
beside them (classes, input shape, device, loss). It holds no ART object: ART is a front end,
``DefendedModel.of`` reads one ``DEQEstimator``'s settings into it, and an ART attack wraps it
in a ``PyTorchClassifier`` of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from deq_attacks.deq.contract import DEQModel
from deq_attacks.deq.readout import Readout
from deq_attacks.gradients import GradientEstimate, input_gradient
from deq_attacks.gradients.base import loss_cotangent
from deq_attacks.interfaces import DEQEstimator, WhiteBoxModule
from deq_attacks.interfaces.inputs import check_labels
from deq_attacks.interfaces.whitebox import eval_mode

Preprocess = Callable[[Tensor], Tensor]
"""``preprocess(x (B, ...) in [0, 1]) -> the DEQ's input``, differentiable (torch)."""

LossLabels = Callable[[Tensor], Tensor]
"""``loss_labels(labels (B,) class indices) -> the labels the loss takes``."""


def check_draws(draws: object) -> int:
    """``draws`` if it is an int >= 1 (a number of EOT draws), else a ValueError."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"eot_draws must be an int >= 1, got {draws!r}")
    return draws


def _identity(x: Tensor) -> Tensor:
    return x


class DefendedModel(nn.Module):
    """A DEQ as attacks see it: ``preprocess`` then ``white_box`` (the column's estimate and
    defense), inputs (B, ...) in [0, 1] to the defended logits (B, nb_classes) float32,
    differentiable through the module's estimate. Attacks that differentiate a torch module
    (AutoAttack, Square) call it; the PGD ascends ``loss_gradient``; ART's attacks wrap it in a
    ``PyTorchClassifier``. An empty batch (an attack's sub-batch after filtering, e.g.
    Square's when no margin is positive) gives empty logits (0, nb_classes), still connected
    to ``x``.

    Args:
        white_box: the DEQ with its estimate and defense (shared, not copied).
        nb_classes: number of classes; input_shape: one input's shape, e.g. (3, 32, 32).
        loss: the loss ``loss_gradient`` ascends (default cross-entropy on the logits).
        loss_labels: class indices (B,) to the labels ``loss`` takes (default: themselves,
            checked to lie in [0, nb_classes)).
        preprocess: the torch preprocessing in front of the DEQ (default none; whether there
            is one is ``preprocesses``).
        draws: the logits are the mean of this many forwards (each a fresh draw of a
            randomized model), so their Jacobian is the mean of the draws' Jacobians:
            expectation over transformation for an attack whose loss is linear in the logits
            (FAB's logit differences), and for the others the gradient of their loss at the
            expected logits. 1: one forward, as without it.
        device: where inputs go (default: the device of the DEQ's first parameter).
    """

    def __init__(
        self,
        white_box: WhiteBoxModule,
        nb_classes: int,
        input_shape: tuple[int, ...],
        *,
        loss: nn.Module | None = None,
        loss_labels: LossLabels | None = None,
        preprocess: Preprocess | None = None,
        draws: int = 1,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(white_box, WhiteBoxModule):
            raise TypeError(
                f"DefendedModel wraps a WhiteBoxModule (DefendedModel.of(estimator) reads a "
                f"DEQEstimator), got {type(white_box).__name__}"
            )
        if isinstance(nb_classes, bool) or not isinstance(nb_classes, int) or nb_classes < 2:
            raise ValueError(f"nb_classes must be an int >= 2, got {nb_classes!r}")
        self.white_box = white_box
        self.nb_classes = nb_classes
        self.input_shape = tuple(input_shape)
        self.loss = loss if loss is not None else nn.CrossEntropyLoss()
        self.loss_labels = loss_labels if loss_labels is not None else self._class_indices
        self.preprocesses = preprocess is not None
        self.preprocess = preprocess if preprocess is not None else _identity
        self.draws = check_draws(draws)
        if device is None:
            parameter = next(white_box.deq.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
        self.device = torch.device(device)

    @classmethod
    def of(
        cls,
        estimator: DEQEstimator,
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
        *,
        draws: int = 1,
    ) -> DefendedModel:
        """The defended model of an ART front end: ``estimator``'s module (a view with
        ``estimate`` and/or ``defense`` if given, else the module itself), its loss and label
        rule, classes, input shape, device and its ART preprocessing (which must be written in
        torch: ART's framework preprocessing, e.g. ``preprocessing=(mean, std)``; none when it
        is only ART's identity standardisation, mean 0 and std 1). An
        estimator with postprocessing defences is refused: they change only ``predict``'s
        output, not the model attacks differentiate."""
        if not estimator.all_framework_preprocessing:
            raise ValueError(
                "the attacks differentiate the preprocessing: give the estimator preprocessing "
                "written in torch (ART's framework preprocessing, e.g. preprocessing=(mean, "
                "std)), not a numpy preprocessing defence"
            )
        if estimator.postprocessing_defences:
            raise ValueError(
                "ART postprocessing defences change only predict's output, not the logits "
                "that attacks differentiate and the verdict scores: build the estimator "
                "without them"
            )
        white_box = estimator.white_box
        if estimate is not None or defense is not None:
            white_box = white_box.view(estimate, defense)

        def preprocess(x: Tensor) -> Tensor:
            processed, _ = estimator._apply_preprocessing(x, y=None, fit=False, no_grad=False)
            return cast(Tensor, processed)

        identity = all(
            hasattr(op, "mean") and np.all(op.mean == 0) and np.all(op.std == 1)
            for op in estimator.preprocessing_operations
        )
        return cls(
            white_box, estimator.nb_classes, tuple(estimator.input_shape),
            loss=estimator._loss, loss_labels=lambda y: estimator._loss_labels(y, len(y)),
            preprocess=None if identity else preprocess,
            draws=draws, device=estimator.device,
        )  # fmt: skip

    def _class_indices(self, labels: Tensor) -> Tensor:
        return check_labels(labels, len(labels), self.nb_classes)

    @property
    def deq(self) -> DEQModel:
        return self.white_box.deq

    @property
    def estimate(self) -> GradientEstimate:
        """The gradient estimate of every gradient of this model."""
        return self.white_box.estimate

    @property
    def defense(self) -> Readout:
        """The readout whose logits this model returns."""
        return self.white_box.defense

    def view(
        self,
        estimate: GradientEstimate | None = None,
        defense: Readout | None = None,
        *,
        draws: int | None = None,
        deq: DEQModel | None = None,
    ) -> DefendedModel:
        """This model with another estimate, defense, number of draws or DEQ (None: this
        one's; ``deq`` computes the same function over the same parameters, e.g.
        ``acceleration.compiled_f``). A new estimate, defense or DEQ is a new
        ``WhiteBoxModule`` over the same parameters; this model is not changed."""
        white_box = self.white_box
        if estimate is not None or defense is not None or deq is not None:
            white_box = white_box.view(estimate, defense, deq=deq)
        return DefendedModel(
            white_box, self.nb_classes, self.input_shape, loss=self.loss,
            loss_labels=self.loss_labels, preprocess=self.preprocess if self.preprocesses else None,
            draws=self.draws if draws is None else draws, device=self.device,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return x.flatten(1).sum(1, keepdim=True).expand(-1, self.nb_classes).float()
        processed = self.preprocess(x)
        logits = cast(Tensor, self.white_box(processed)).float()
        for _ in range(self.draws - 1):
            logits = logits + cast(Tensor, self.white_box(processed)).float()
        return logits if self.draws == 1 else logits / self.draws

    def loss_gradient(self, x: Tensor, labels: Tensor) -> Tensor:
        """dL/dx (shaped like x) of ``loss`` of ``labels`` (B,) class indices, evaluated at
        each surrogate state of the module's estimate (Eq. 11, 13, 17), back through the
        preprocessing; the same gradient as ``DEQEstimator.loss_gradient``, counted in the
        module's ``backward_calls``."""
        module = self.white_box
        targets = self.loss_labels(labels)
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            inputs = self.preprocess(x_leaf)
            with eval_mode(module.deq):
                grad = input_gradient(
                    module.deq, module.estimate, inputs, loss_cotangent(self.loss, targets),
                    None, module.defense,
                )  # fmt: skip
            if inputs is not x_leaf:  # back through the torch preprocessing
                (grad,) = torch.autograd.grad(inputs, x_leaf, grad)
        module.backward_calls += 1
        return grad

    def extra_repr(self) -> str:
        return f"nb_classes={self.nb_classes}, input_shape={self.input_shape}, draws={self.draws}"


def as_defended(model: DefendedModel | DEQEstimator) -> DefendedModel:
    """``model`` itself, or the defended model of an ART front end (``DefendedModel.of``)."""
    if isinstance(model, DefendedModel):
        return model
    if isinstance(model, DEQEstimator):
        return DefendedModel.of(model)
    raise TypeError(f"expected a DefendedModel or a DEQEstimator, got {type(model).__name__}")


class NonFiniteAsWrong(nn.Module):
    """``model`` for an attack that judges success on the logits itself (AutoAttack, Square):
    a row whose logits are not finite is answered with finite one-hot logits of a class that
    is none of the labels of the block's clean samples within ``eps`` of it, so the
    attack sees a success and returns that point (``argmax`` of NaN is 0: a class-0 sample
    would otherwise look unbroken). The verdict is made afterwards on the defended logits
    (``scoring.correct``), where the point counts as not robust. A row with every class among
    those labels keeps its NaN.

    Args:
        model: inputs (m, ...) to logits (m, K).
        x, y: the block's clean inputs (B, ...) and labels (B,), on the model's device.
        eps: the budget of the attack, in ``norm`` ("Linf" or "L2").
    """

    def __init__(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "Linf"
    ) -> None:
        super().__init__()
        self.model, self.x, self.y, self.eps = model, x.detach(), y.detach(), float(eps)
        self.order = {"Linf": float("inf"), "L2": 2.0}[norm]

    def forward(self, x: Tensor) -> Tensor:
        logits = cast(Tensor, self.model(x))
        bad = ~torch.isfinite(logits).all(1)
        if not bool(bad.any()):
            return logits
        clean = self.x.flatten(1)
        distance = torch.stack(  # (m, B), one bad row at a time: no (m, B, D) tensor
            [
                torch.linalg.vector_norm(row - clean, self.order, dim=1)
                for row in x.detach()[bad].flatten(1)
            ]
        )
        near = (distance <= self.eps * (1 + 1e-5) + 1e-7).float()
        classes = logits.shape[1]
        taken = near @ nn.functional.one_hot(self.y.long(), classes).float() > 0  # (m, K)
        other = (~taken).float().argmax(1)
        substitute = nn.functional.one_hot(other, classes).to(logits.dtype)
        substitute[taken.all(1)] = float("nan")
        out = logits.clone()
        out[bad] = substitute
        return out
