"""PGD adversaries for PGD-AT and for the development check: the attack layer's torch PGD
(``adversary="torch"``, the default) or ART's ``ProjectedGradientDescent`` over a
``DEQEstimator`` (``adversary="art"``).

Both run batch by batch in eval mode (as the reference code does), with the gradient that
training uses (Appendix A): ``deq_attacks.gradients.ready_made(training_gradient)``. The torch
PGD draws its random start as ART does (``art_random_start``: numpy's global generator) and
steps in ART's arithmetic, so the two give the same adversaries and the same training run
(``tests/test_training_adversary.py``); the torch one skips ART's array round trips and its
closing success-rate forward. ART's ``AdversarialTrainerMadryPGD`` drives a ``DEQEstimator``
too: ``execution.trainer="art_madry"`` makes it drive ``run_training``
(``training/art_trainer.py``, over ``art_classifier``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

from deq_attacks.adversarial import ART_NORMS, DefendedModel, Gradient, art_random_start, pgd
from deq_attacks.deq import DEQ
from deq_attacks.gradients import ready_made
from deq_attacks.interfaces import DEQEstimator, WhiteBoxModule, art_device_type

#: The adversaries of ``TrainConfig.threat.adversary``.
ADVERSARIES = ("torch", "art")

Adversary = Callable[[Tensor, Tensor], Tensor]
"""``adversary(x (B, C, H, W), y (B,)) -> x_adv`` on x's device; leaves the model in eval mode."""


@dataclass(frozen=True)
class Budget:
    """The PGD of the threat model: ``steps`` steps of size ``step`` in ``norm`` ("Linf" or
    "L2") within ``eps``, from one random start if ``random_start``."""

    eps: float
    step: float
    steps: int
    random_start: bool
    norm: str = "Linf"


def art_classifier(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    loss: nn.Module | None = None,
) -> PyTorchClassifier:
    """ART's view of ``model`` (sharing its parameters): a DEQ as a ``DEQEstimator`` whose
    gradient is its training gradient, any other network as a plain ``PyTorchClassifier``;
    ``optimizer`` for ART's ``fit`` (and trainers), ``loss`` (default cross-entropy) for both
    ``fit`` and the attacks' gradients."""
    device_type = art_device_type(device)
    loss = loss if loss is not None else nn.CrossEntropyLoss()
    if isinstance(model, DEQ):
        return DEQEstimator(
            model,
            loss,
            image_shape,
            num_classes,
            optimizer,
            estimate=ready_made(model.training_gradient),
            clip_values=(0.0, 1.0),
            device_type=device_type,
        )
    return PyTorchClassifier(
        model,
        loss=loss,
        input_shape=image_shape,
        nb_classes=num_classes,
        optimizer=optimizer,
        clip_values=(0.0, 1.0),
        device_type=device_type,
    )


def pgd_attack(
    classifier: PyTorchClassifier, budget: Budget, batch_size: int
) -> ProjectedGradientDescent:
    """ART's PGD of ``budget`` (norm inf or 2, ``num_random_init`` 1 or 0)."""
    return ProjectedGradientDescent(
        classifier,
        norm=ART_NORMS[budget.norm],
        eps=budget.eps,
        eps_step=budget.step,
        max_iter=budget.steps,
        num_random_init=1 if budget.random_start else 0,
        batch_size=batch_size,
        verbose=False,
    )


def training_gradient(
    model: nn.Module, image_shape: tuple[int, int, int], num_classes: int
) -> Gradient:
    """The cross-entropy gradient w.r.t. the input that the adversary ascends: a DEQ's by its
    ready-made estimate, through the attack layer's ``DefendedModel.loss_gradient`` (loss-aware,
    the gradient the protocol's PGD columns ascend; the loader's labels taken as they are),
    any other network's by autograd."""
    loss = nn.CrossEntropyLoss()
    if isinstance(model, DEQ):
        module = WhiteBoxModule(model, ready_made(model.training_gradient))
        defended = DefendedModel(
            module, num_classes, image_shape, loss=loss, loss_labels=lambda labels: labels
        )
        return defended.loss_gradient

    def autograd(x: Tensor, labels: Tensor) -> Tensor:
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(loss(model(x_leaf), labels), x_leaf)
        return grad

    return autograd


def make_adversary(
    kind: str,
    model: nn.Module,
    budget: Budget,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    batch_size: int,
) -> Adversary:
    """The ``kind`` adversary ("torch" or "art", ``ADVERSARIES``) of ``budget`` on ``model``
    (batches of at most ``batch_size``)."""
    if kind == "torch":
        gradient = training_gradient(model, image_shape, num_classes)

        def torch_pgd(x: Tensor, y: Tensor) -> Tensor:
            model.eval()
            x = x.detach()
            start = art_random_start(x, budget.eps, budget.norm) if budget.random_start else x
            return pgd(
                gradient, x, y, start, eps=budget.eps, step=budget.step, steps=budget.steps,
                norm=budget.norm,
            )  # fmt: skip

        return torch_pgd
    if kind == "art":
        attack = pgd_attack(
            art_classifier(model, image_shape, num_classes, device), budget, batch_size
        )
        return lambda x, y: art_batch(attack, model, x, y, num_classes)
    raise ValueError(f"adversary must be one of {', '.join(ADVERSARIES)}, got {kind!r}")


def art_batch(
    attack: ProjectedGradientDescent, model: nn.Module, x: Tensor, y: Tensor, num_classes: int
) -> Tensor:
    """ART's adversarial examples (B, C, H, W) for (x, y) on x's device; the model is left in
    eval mode (ART's gradient calls put it there)."""
    model.eval()
    one_hot = np.eye(num_classes, dtype=np.float32)[y.cpu().numpy()]
    x_adv = attack.generate(x.detach().cpu().numpy(), one_hot)
    return torch.from_numpy(x_adv).to(x.device)
