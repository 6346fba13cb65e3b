"""ART's own trainer driving ``run_training`` (``execution.trainer="art_madry"``): each epoch is
one ``AdversarialTrainerMadryPGD(estimator, nb_epochs=1, ...).fit(x, y, scheduler=...)`` over
a ``DEQEstimator`` (a ``PyTorchClassifier`` for the baselines) that shares the run's model, Adam
and cosine schedule; the loop does the rest of each epoch (dev check, checkpoint, log, plots,
best epoch) and resumes at epoch boundaries as for its own steps.

What ART's trainer does in an epoch (ART 1.20, ``AdversarialTrainer.fit``): it shuffles the
training set (numpy's global generator), then per batch of ``batch_size`` (the last one
smaller) runs ART's L-inf PGD with the estimator's gradient (the training gradient; the random
start from numpy's global generator) and one ``estimator.fit`` on the adversarial batch: one
Adam step (torch's generator for its DataLoader and dropout) and one step of the schedule
(``scheduler=``, which ART steps after each fit epoch: here after each batch, so the cosine
decay is per step as in our loop). The run saves numpy's and torch's streams after each epoch,
so a resumed run continues them exactly. Augmentation is honoured: each epoch's arrays are
drawn afresh through the data set's transform (torch's generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from art.defences.trainer import AdversarialTrainerMadryPGD
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from deq_attacks.acceleration import Acceleration
from deq_attacks.training.adversary import art_classifier
from deq_attacks.training.config import TrainConfig


def steps_per_epoch(images: int, batch_size: int) -> int:
    """ART's batches per epoch: the last one may be smaller (it drops none)."""
    return math.ceil(images / batch_size)


@dataclass(frozen=True)
class EpochTotals:
    """What the training forwards of one ART epoch gave: mean cross-entropy, correct
    predictions, samples and optimizer steps."""

    loss: float
    correct: int
    samples: int
    steps: int


class RecordingLoss(nn.CrossEntropyLoss):
    """Cross-entropy that also sums the loss, correct predictions and samples of the forwards
    made while ``model`` trains (ART's ``fit``; its PGD calls the loss with the model in eval
    mode, and those calls are not counted). Sums stay on the device until ``totals``; each
    counted call advances ``progress``, if set."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = [model]  # a list: not registered as a submodule of the loss
        self.progress: tqdm | None = None  # type: ignore[type-arg]
        self.reset()

    def reset(self) -> None:
        self._loss_sum: Tensor | float = 0.0
        self._correct: Tensor | int = 0
        self._samples = 0
        self._calls = 0

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``logits`` (B, classes) against class indices (B,) or scores."""
        loss = super().forward(logits, target)
        if self._model[0].training:
            labels = target.argmax(1) if target.ndim == 2 else target
            self._loss_sum = self._loss_sum + loss.detach() * len(labels)
            self._correct = self._correct + (logits.detach().argmax(1) == labels).sum()
            self._samples += len(labels)
            self._calls += 1
            if self.progress is not None:
                self.progress.update(1)
        return loss

    def totals(self) -> EpochTotals:
        samples = max(self._samples, 1)
        return EpochTotals(
            float(self._loss_sum) / samples, int(self._correct), self._samples, self._calls
        )


def epoch_arrays(train: Dataset[tuple[Tensor, Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """The training set as arrays, each item drawn through its transform (augmentation, from
    torch's generator): images float32 (N, C, H, W), labels int64 (N,)."""
    images, labels = [], []
    for index in range(len(train)):  # type: ignore[arg-type]
        image, label = train[index]
        images.append(image)
        labels.append(int(label))
    return torch.stack(images).numpy(), np.asarray(labels, dtype=np.int64)


@dataclass
class ArtMadryEpochs:
    """ART's ``AdversarialTrainerMadryPGD`` over the run's model, one ``fit`` per epoch; the
    loop's epoch end reads ``model``, ``optimizer``, ``schedule`` and ``acceleration``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    acceleration: Acceleration
    trainer: AdversarialTrainerMadryPGD
    loss: RecordingLoss

    def fit_epoch(self, train: Dataset[tuple[Tensor, Tensor]], epoch: int) -> EpochTotals:
        """The 0-based ``epoch`` of ART's trainer on ``train`` (drawn afresh), with a progress
        bar of its batches; the schedule steps once per batch."""
        x, y = epoch_arrays(train)
        self.loss.reset()
        batches = steps_per_epoch(len(y), self.trainer.batch_size)
        with tqdm(total=batches, desc=f"epoch {epoch + 1}", leave=False) as bar:
            self.loss.progress = bar
            try:
                self.trainer.fit(x, y, scheduler=self.schedule)
            finally:
                self.loss.progress = None
        return self.loss.totals()


def art_madry(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
) -> ArtMadryEpochs:
    """ART's trainer for ``config``'s threat (eps, step, steps, random start) and batch, over
    an estimator of ``model`` whose gradient is the training gradient, with ``optimizer``."""
    loss = RecordingLoss(model)
    estimator = art_classifier(model, image_shape, num_classes, device, optimizer, loss)
    threat = config.threat
    trainer = AdversarialTrainerMadryPGD(
        estimator,
        nb_epochs=1,
        batch_size=config.optimiser.batch_size,
        eps=threat.eps,
        eps_step=threat.step,
        max_iter=threat.steps,
        num_random_init=1 if threat.random_start else 0,
    )
    return ArtMadryEpochs(model, optimizer, schedule, config.execution.acceleration, trainer, loss)
