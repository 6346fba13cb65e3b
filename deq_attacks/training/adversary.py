"""PGD adversaries for PGD-AT and for the development check, through ART.

Our loop calls ART's ``ProjectedGradientDescent`` batch by batch (L-inf, ``num_random_init=1``
for a uniform random start clipped to [0, 1]). ART's ``AdversarialTrainerMadryPGD`` is not
used: its ``fit`` takes arrays in memory (no per-epoch augmentation) and it has no
``fit_generator``; ART's generic ``AdversarialTrainer.fit_generator`` takes an ART
``DataGenerator`` but then owns the loop, so it cannot run the unrolled pretraining, the
per-step cosine schedule, the Jacobian-regulariser schedule, DistributedDataParallel, bf16
autocast or exact resume. The adversary is generated in eval mode (as the reference code
does), with the gradient that training uses (Appendix A):
``deq_attacks.gradients.ready_made(training_gradient)``.
"""

from __future__ import annotations

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

from deq_attacks.deq import DEQ
from deq_attacks.gradients import ready_made
from deq_attacks.interfaces import DEQEstimator


def art_classifier(
    model: nn.Module, image_shape: tuple[int, int, int], num_classes: int, device: torch.device
) -> PyTorchClassifier:
    """ART's view of ``model`` (sharing its parameters): a DEQ as a ``DEQEstimator`` whose
    gradient is its training gradient, any other network as a plain ``PyTorchClassifier``."""
    device_type = "gpu" if device.type == "cuda" else "cpu"
    if isinstance(model, DEQ):
        return DEQEstimator(
            model,
            input_shape=image_shape,
            nb_classes=num_classes,
            estimate=ready_made(model.training_gradient),
            clip_values=(0.0, 1.0),
            device_type=device_type,
        )
    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=image_shape,
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type=device_type,
    )


def pgd_attack(
    classifier: PyTorchClassifier,
    eps: float,
    step: float,
    steps: int,
    random_start: bool,
    batch_size: int,
    norm: str = "Linf",
) -> ProjectedGradientDescent:
    """ART's PGD under ``norm`` ("Linf" or "L2"; ``steps`` iterations of size ``step``, one
    random start if asked)."""
    return ProjectedGradientDescent(
        classifier,
        norm={"Linf": np.inf, "L2": 2}[norm],
        eps=eps,
        eps_step=step,
        max_iter=steps,
        num_random_init=1 if random_start else 0,
        batch_size=batch_size,
        verbose=False,
    )


def adversarial_batch(
    attack: ProjectedGradientDescent, model: nn.Module, x: Tensor, y: Tensor, num_classes: int
) -> Tensor:
    """Adversarial examples (B, C, H, W) for (x, y) on x's device; the model is left in eval
    mode (ART's gradient calls put it there)."""
    model.eval()
    one_hot = np.eye(num_classes, dtype=np.float32)[y.cpu().numpy()]
    x_adv = attack.generate(x.detach().cpu().numpy(), one_hot)
    return torch.from_numpy(x_adv).to(x.device)
