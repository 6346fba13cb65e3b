"""Adversarial training of DEQs and baselines (Sec. 6, Appendix A, Table 7).

- ``run_training(TrainConfig, run_dir)``: the paper's recipe over a DataLoader (the ``train``
  subcommand), resumable exactly, one process or several under torchrun.
- ``TrainConfig`` and the named ``PRESETS``.
- ``train(estimator, x, y, TrainingConfig)``: in-memory arrays through ART's
  ``AdversarialTrainerMadryPGD`` (the quick path the demo uses).
"""

from deq_attacks.training.art_trainer import TrainingConfig, TrainingState, train
from deq_attacks.training.config import Device, Gradient, TrainConfig
from deq_attacks.training.loop import RunResult, run_training
from deq_attacks.training.presets import PRESETS, preset
from deq_attacks.training.resume import ConfigMismatchError, RunState

__all__ = [
    "PRESETS",
    "ConfigMismatchError",
    "Device",
    "Gradient",
    "RunResult",
    "RunState",
    "TrainConfig",
    "TrainingConfig",
    "TrainingState",
    "preset",
    "run_training",
    "train",
]
