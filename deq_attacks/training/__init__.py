"""Adversarial training of DEQs and baselines (Sec. 6, Appendix A, Table 7).

- ``run_training(TrainConfig, run_dir, data=None)``: the one training loop (the ``train``
  subcommand and the demo), resumable exactly, one process or several under torchrun; on the
  data set the config names, or on arrays in memory (``data="memory"``).
- ``TrainConfig`` and the named ``PRESETS`` (the paper's, the CPU ones and ``demo``).
- ``train_cached(config, cache, name)``: a run folder per config (``<cache>/<name>-<config
  fingerprint>``) that several scripts share; the model comes back with its best weights.

ART's ``AdversarialTrainerMadryPGD`` can drive ``run_training`` (``execution.trainer=
"art_madry"``, ``training/art_trainer.py``); ART's trainers (Madry, TRADES) also train a
``DEQEstimator`` by hand: see docs/training.md. The names are imported on first use
(``deq_attacks.lazy``).
"""

from typing import TYPE_CHECKING

from deq_attacks.lazy import lazy_exports

if TYPE_CHECKING:
    from deq_attacks.training.cache import train_cached
    from deq_attacks.training.config import MEMORY_DATA, Device, Gradient, TrainConfig
    from deq_attacks.training.loop import RunResult, run_training
    from deq_attacks.training.presets import PRESETS, preset
    from deq_attacks.training.resume import ConfigMismatchError, RunState

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "deq_attacks.training.cache": ("train_cached",),
        "deq_attacks.training.config": ("MEMORY_DATA", "Device", "Gradient", "TrainConfig"),
        "deq_attacks.training.loop": ("RunResult", "run_training"),
        "deq_attacks.training.presets": ("PRESETS", "preset"),
        "deq_attacks.training.resume": ("ConfigMismatchError", "RunState"),
    },
)

__all__ = [
    "MEMORY_DATA",
    "PRESETS",
    "ConfigMismatchError",
    "Device",
    "Gradient",
    "RunResult",
    "RunState",
    "TrainConfig",
    "preset",
    "run_training",
    "train_cached",
]
