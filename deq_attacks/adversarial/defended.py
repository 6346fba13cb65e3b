"""The defended model that attacks differentiate: ``DEQEstimator``'s preprocessing in front of
its ``WhiteBoxModule``, as a torch module (logits) and as a loss-aware gradient (the PGD's)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from deq_attacks.gradients import input_gradient
from deq_attacks.gradients.base import loss_cotangent
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.interfaces.whitebox import eval_mode


def check_draws(draws: object) -> int:
    """``draws`` if it is an int >= 1 (a number of EOT draws), else a ValueError."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"eot_draws must be an int >= 1, got {draws!r}")
    return draws


class DefendedModel(nn.Module):
    """``estimator.model`` behind the estimator's ART preprocessing: inputs in [0, 1] to the
    defended logits (float32), differentiable through the estimator's estimate. Attacks that
    differentiate a torch module (AutoAttack, Square) receive this. An empty batch (an attack's
    sub-batch after filtering, e.g. Square's when no margin is positive) gives empty logits
    (0, nb_classes), still connected to ``x``.

    Args:
        draws: the logits are the mean of this many forwards (each a fresh draw of a
            randomized model), so their Jacobian is the mean of the draws' Jacobians:
            expectation over transformation for an attack whose loss is linear in the logits
            (FAB's logit differences), and for the others the gradient of their loss at the
            expected logits. 1: one forward, as without it.
    """

    def __init__(self, estimator: DEQEstimator, draws: int = 1) -> None:
        super().__init__()
        self.estimator = estimator
        self.white_box = estimator.model
        self.draws = check_draws(draws)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return x.flatten(1).sum(1, keepdim=True).expand(-1, self.estimator.nb_classes).float()
        processed, _ = self.estimator._apply_preprocessing(x, y=None, fit=False, no_grad=False)
        logits = cast(Tensor, self.white_box(processed)).float()
        for _ in range(self.draws - 1):
            logits = logits + cast(Tensor, self.white_box(processed)).float()
        return logits if self.draws == 1 else logits / self.draws

    def loss_gradient(self, x: Tensor, labels: Tensor) -> Tensor:
        """dL/dx (shaped like x) of the estimator's loss of ``labels`` (B,) class indices,
        evaluated at each surrogate state of the module's estimate (Eq. 11, 13, 17), back
        through the preprocessing; the same gradient as ``DEQEstimator.loss_gradient``, on
        the module itself (no ART call), counted in the module's ``backward_calls``."""
        if not self.estimator.all_framework_preprocessing:
            raise ValueError(
                "the torch attacks need the estimator's preprocessing written in torch (ART's "
                "framework preprocessing)"
            )
        module = self.white_box
        targets = self.estimator._loss_labels(labels, len(labels))
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            inputs, _ = self.estimator._apply_preprocessing(
                x_leaf, y=None, fit=False, no_grad=False
            )
            with eval_mode(module.deq):
                grad = input_gradient(
                    module.deq, module.estimate, inputs,
                    loss_cotangent(self.estimator._loss, targets), None, module.defense,
                )  # fmt: skip
            if inputs is not x_leaf:  # back through the torch preprocessing
                (grad,) = torch.autograd.grad(inputs, x_leaf, grad)
        module.backward_calls += 1
        return grad


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
