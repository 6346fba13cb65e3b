"""A folder of trained models shared by several scripts: one run folder per config,
``<cache>/<name>-<config.fingerprint()>``, so that a second script asking for the same config
finds the finished run at once (and an interrupted one resumes), while a changed setting (other
than the run-only ones: threads, workers, where the data lives, plots) trains a new model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deq_attacks.training.config import TrainConfig
from deq_attacks.training.loop import RunResult, run_training


def train_cached(
    config: TrainConfig,
    cache: str | Path,
    name: str,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train (resume, or find already trained) ``config`` in ``<cache>/<name>-<fingerprint>``
    (``run_training``); the result's model holds the best epoch's weights, in eval mode.

    Raises what ``run_training`` raises (a ValueError for a config it refuses)."""
    if not name or "/" in name:
        raise ValueError(f"name must be a non-empty folder-name prefix, got {name!r}")
    result = run_training(config, Path(cache) / f"{name}-{config.fingerprint()}", log=log)
    result.load_best()
    return result
