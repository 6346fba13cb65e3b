"""What every step of one evaluation run needs, in one place: the defended model, the splits,
the settings, the result store, the shards, the progress callback, the run's ConvergenceLog and
the wall time of each step; and the one column runner of every mode
(``RunContext.run_column``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deq_attacks.adversarial import DefendedModel, SampleSeeds, precision
from deq_attacks.deq.convergence import ConvergenceLog
from deq_attacks.deq.readout import Readout
from deq_attacks.evaluation.attacks import Column, ThreatModel
from deq_attacks.evaluation.cost import FCounter
from deq_attacks.evaluation.distributed import BlockMap, BlockResult, Shards
from deq_attacks.evaluation.scores import Scores
from deq_attacks.evaluation.scoring import score_readouts
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.evaluation.store import ResultStore
from deq_attacks.gradients import GradientEstimate
from deq_attacks.interfaces.inputs import check_data


def check_split(name: str, x: np.ndarray, y: np.ndarray, model: DefendedModel) -> None:
    """Raise, naming the split, unless (x, y) are images the model takes and labels."""
    check_data(x, y, model.input_shape, model.nb_classes, name)


def arrays(stored: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A stored step's per-sample lists as numpy arrays."""
    return {k: np.asarray(v) for k, v in stored.items()}


@dataclass
class RunContext:
    """One run of the protocol.

    Attributes:
        model: the defended model (``DefendedModel.of`` of the user's estimator), the one
            every step runs on; never changed (every switch of estimate or defense is a
            view of it).
        x, y: the test split; x_dev, y_dev: the development split.
        config: the settings; batch: the attack batch (= shard block) on this device.
        store: finished steps and blocks (resume); shards: this process's share.
        say: progress callback; log: the run's ConvergenceLog.
        ready: the ready-made estimate (the training gradient's).
        timings: per named step (filled by ``step``), its wall seconds ``"wall_s"``, this
            process's CPU seconds ``"cpu_s"`` (all threads; other jobs on the machine do
            not inflate it) and the f evaluations it made ``"f_evals"`` (``f_count``).
        f_count: the run's f evaluations so far (``cost.counting_f``), None: not counted.
    """

    model: DefendedModel
    x: np.ndarray
    y: np.ndarray
    x_dev: np.ndarray
    y_dev: np.ndarray
    config: EvaluationConfig
    store: ResultStore
    shards: Shards
    say: Callable[[str], None]
    log: ConvergenceLog
    ready: GradientEstimate
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    f_count: FCounter | None = None

    @property
    def threat(self) -> ThreatModel:
        return self.config.threat

    @property
    def batch(self) -> int:
        return self.shards.block_size

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the step ``name`` (added to ``timings``)."""
        wall, cpu = time.perf_counter(), time.process_time()
        evaluations = self.f_count.total if self.f_count is not None else 0
        try:
            yield
        finally:
            spent = self.timings.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "f_evals": 0})
            spent["wall_s"] += time.perf_counter() - wall
            spent["cpu_s"] += time.process_time() - cpu
            if self.f_count is not None:
                spent["f_evals"] += self.f_count.total - evaluations

    def blockwise(
        self, key: str, fn: Callable[[np.ndarray], BlockResult], indices: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Step ``key``: ``fn`` on the blocks of ``indices`` (``BlockMap``), each finished
        block recorded in the store at once; a finished step, or its finished blocks, are
        read back instead of recomputed. ``fn`` returns the block's ``"index"`` with its
        per-sample arrays."""
        done = self.store.get(key)
        if done is not None:
            return arrays(done)
        blocks = self._blocks(key, indices)
        for number, part in blocks.mine():
            blocks.finish(number, fn(part))
        return arrays(self.store.put(key, blocks.result()))

    def is_ready(self, column: Column) -> bool:
        """Whether ``column`` is the ready-made PGD (the fixed-step PGD with the training
        gradient's estimate ``ready``), the run every mode makes on every sample."""
        return column.attack.name == "pgd" and column.estimate == self.ready

    def run_column(
        self,
        column: Column,
        defenses: Mapping[str, Readout],
        indices: np.ndarray,
        *,
        development: bool = False,
        key: str | None = None,
    ) -> Scores:
        """``column`` on the samples ``indices`` of the test split (the development split if
        ``development``) against ``defenses``, block by block, each block stored (a finished
        run or block is read back): a shared column in one run scored for every defense (and
        every iterate), any other in one run per defense. Each run attacks one view of the
        defended model (the column's estimate, its first defense), in ``config.precision``, with
        the samples' own seeds (``config.seed``, the column's label). Its store key is
        ``key`` (one run only), else ``[dev/]shared/<label>`` or ``[dev/]<defense>/<label>``;
        the returned scores hold each run's extras under that key."""
        x, y = (self.x_dev, self.y_dev) if development else (self.x, self.y)
        prefix = "dev/" if development else ""
        runs = (
            {f"{prefix}shared/{column.label}": dict(defenses)}
            if column.shared
            else {f"{prefix}{d}/{column.label}": {d: r} for d, r in defenses.items()}
        )
        if key is not None:
            if len(runs) != 1:
                raise ValueError(f"one store key names one run, not {len(runs)}: {key!r}")
            runs = {key: next(iter(runs.values()))}
        found = Scores({})
        for run, readouts in runs.items():
            done = self.store.get(run)
            if done is None:
                first = next(iter(readouts.values()))
                model = self.model.view(column.estimate, first)
                blocks = self._blocks(run, indices)
                for number, part in blocks.mine():
                    seeds = SampleSeeds(self.config.seed, column.label, part)
                    with precision(model.device, self.config.precision):
                        output = column.attack.run(model, x[part], y[part], self.threat, seeds)
                    scores = score_readouts(
                        self.model, output.x_adv, y[part], readouts, len(part)
                    )
                    if not column.shared:
                        scores = Scores(scores.correct, scores.finite)
                    scores.index, scores.extras = part, {run: output.extras}
                    blocks.finish(number, scores.arrays(run))
                done = self.store.put(run, blocks.result())
            found = found.merge(Scores.from_arrays(done, run))
        return found

    def _blocks(self, key: str, indices: np.ndarray) -> BlockMap:
        """The blocks of step ``key`` on ``indices``, its finished ones read from the store
        (checked to hold the same samples), each new one stored when gathered."""
        partial = {n: arrays(v) for n, v in self.store.blocks(key).items()}
        expected = self.shards.cut(np.asarray(indices, dtype=np.int64))
        for number, block in partial.items():
            if number >= len(expected) or not np.array_equal(block["index"], expected[number]):
                raise RuntimeError(f"the store's block {number} of {key!r} holds other samples")
        return BlockMap(
            indices, self.shards, done=partial,
            on_block=lambda number, value: self.store.put_block(key, number, value),
        )  # fmt: skip
