"""PGD-AT of a DEQ on in-memory arrays through ART's ``AdversarialTrainerMadryPGD``, resumable
after each epoch (the quick path of ``deq-attacks demo``; the paper's recipe over a DataLoader
is ``deq_attacks.training.loop``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.defences.trainer import AdversarialTrainerMadryPGD
from tqdm.auto import tqdm

from deq_attacks.checkpoints import load_weights, save_weights
from deq_attacks.gradients import GradientEstimate, ready_made
from deq_attacks.interfaces import DEQEstimator


@dataclass(frozen=True)
class TrainingConfig:
    """Clean pretraining then PGD-AT (L-inf), Adam with cosine decay over all epochs.

    Args:
        clean_epochs: epochs of standard training first (the paper pretrains 16,000 steps).
        adversarial_epochs: epochs of PGD-AT after that (0: standard training only).
        batch_size: training batch (paper: 96).
        lr: initial Adam learning rate (paper: 1e-3).
        eps, step, steps: the PGD adversary of PGD-AT.
        eps_warmup_epochs: adversarial epochs over which eps grows linearly to ``eps``.
    """

    clean_epochs: int = 5
    adversarial_epochs: int = 0
    batch_size: int = 96
    lr: float = 1e-3
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    eps_warmup_epochs: int = 0

    def __post_init__(self) -> None:
        for name in ("clean_epochs", "adversarial_epochs", "eps_warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.clean_epochs + self.adversarial_epochs < 1:
            raise ValueError("train for at least one epoch")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError("batch_size and steps must be >= 1")
        if not (self.lr > 0 and 0 < self.eps <= 1 and 0 < self.step <= 1):
            raise ValueError("lr must be > 0 and eps, step in (0, 1]")

    @property
    def epochs(self) -> int:
        return self.clean_epochs + self.adversarial_epochs

    def lr_at(self, epoch: int) -> float:
        """Cosine decay from ``lr`` to 0 over all epochs."""
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))

    def eps_at(self, adversarial_epoch: int) -> float:
        if self.eps_warmup_epochs == 0:
            return self.eps
        return self.eps * min(1.0, (adversarial_epoch + 1) / self.eps_warmup_epochs)


@dataclass
class TrainingState:
    """What a checkpoint folder remembers besides the weights."""

    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_pgd_accuracy: float | None = None


def validate(
    estimator: DEQEstimator,
    validation: tuple[np.ndarray, np.ndarray],
    config: TrainingConfig,
    estimate: GradientEstimate,
) -> dict[str, float]:
    """Clean and PGD accuracy on the validation split, PGD using ``estimate``."""
    x_val, y_val = validation
    clean = estimator.predict(x_val, batch_size=config.batch_size).argmax(1)
    with estimator.using(estimate=estimate):
        x_adv = ProjectedGradientDescent(
            estimator,
            eps=config.eps,
            eps_step=config.step,
            max_iter=config.steps,
            num_random_init=1,  # the threat model's uniform random start
            batch_size=config.batch_size,
            verbose=False,
        ).generate(x_val, np.eye(estimator.nb_classes, dtype=np.float32)[y_val])
    robust = estimator.predict(x_adv, batch_size=config.batch_size).argmax(1)
    return {
        "val_clean_accuracy": float((clean == y_val).mean()),
        "val_pgd_accuracy": float((robust == y_val).mean()),
    }


def train(
    estimator: DEQEstimator,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainingConfig,
    checkpoint_dir: str | Path | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainingState:
    """Train the estimator's DEQ; with ``checkpoint_dir``, every epoch is saved and a rerun
    resumes after the last finished epoch.

    The estimator needs an optimizer. Its gradient estimate is set to the one matching the
    DEQ's training gradient while adversaries are generated, and restored afterwards. With
    ``validation``, each epoch records clean and PGD accuracy on it (PGD with the training
    gradient, the config's eps, step and steps) and the best epoch by PGD accuracy is kept as
    ``best.safetensors`` (Appendix A's checkpoint choice).
    """
    if estimator.optimizer is None:
        raise ValueError("the estimator needs an optimizer to train")
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = TrainingState()
    if checkpoint_dir is not None and (checkpoint_dir / "state.json").exists():
        state = TrainingState(**json.loads((checkpoint_dir / "state.json").read_text()))
        load_weights(estimator.deq, checkpoint_dir / "model.safetensors")
        estimator.optimizer.load_state_dict(
            torch.load(checkpoint_dir / "optimizer.pt", weights_only=True)
        )
    estimate = ready_made(estimator.deq.training_gradient)
    epochs = tqdm(range(config.epochs), initial=state.epochs_done, desc="training epochs")
    for epoch in epochs:
        if epoch < state.epochs_done:
            continue
        for group in estimator.optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        record: dict[str, float] = {"epoch": epoch + 1, "lr": config.lr_at(epoch)}
        with estimator.using(estimate=estimate):
            if epoch < config.clean_epochs:
                estimator.fit(x, y, batch_size=config.batch_size, nb_epochs=1, verbose=False)
            else:
                eps = config.eps_at(epoch - config.clean_epochs)
                record["eps"] = eps
                AdversarialTrainerMadryPGD(
                    estimator,
                    nb_epochs=1,
                    batch_size=config.batch_size,
                    eps=eps,
                    eps_step=min(config.step, eps),
                    max_iter=config.steps,
                ).fit(x, y)
        improved = False
        if validation is not None:
            record.update(validate(estimator, validation, config, estimate))
            best = state.best_val_pgd_accuracy
            improved = best is None or record["val_pgd_accuracy"] > best
            if improved:
                state.best_epoch, state.best_val_pgd_accuracy = (
                    epoch + 1,
                    record["val_pgd_accuracy"],
                )
        state.history.append(record)
        state.epochs_done = epoch + 1
        epochs.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
        if checkpoint_dir is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_weights(estimator.deq, checkpoint_dir / "model.safetensors")
            if improved:
                save_weights(estimator.deq, checkpoint_dir / "best.safetensors")
            torch.save(estimator.optimizer.state_dict(), checkpoint_dir / "optimizer.pt")
            (checkpoint_dir / "state.json").write_text(json.dumps(asdict(state), indent=2))
    return state
