"""The training loop of Table 7: clean pretraining of the unrolled network for
``pretrain_steps`` optimizer steps, then PGD-AT in DEQ mode; per-step cosine decay; the Jacobian
penalty on the steps its schedule names (until ``jac_stop_epoch``); after each epoch, the dev
measurements, the best checkpoint by dev PGD accuracy, logs, plots and an exact-resume
checkpoint. One loop for every data source: a data set the config names, or arrays in memory
(``run_training(config, run_dir, data=(x, y))`` with ``data="memory"``). With
``execution.trainer="art_madry"`` ART's ``AdversarialTrainerMadryPGD`` makes each epoch's steps
(``training/art_trainer.py``) and this loop the rest of the epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from deq_attacks import distributed
from deq_attacks.acceleration import Acceleration
from deq_attacks.checkpoints import load_weights
from deq_attacks.deq import DEQ, JacobianRegularization
from deq_attacks.interfaces.inputs import check_model_fits
from deq_attacks.models.registry import resolve_builder
from deq_attacks.training import art_trainer, resume
from deq_attacks.training.adversary import Adversary, Budget, make_adversary
from deq_attacks.training.build import (
    JacobianSchedule,
    TrainingModule,
    jacobian_schedule,
    optimizer_and_schedule,
    training_model,
)
from deq_attacks.training.config import TrainConfig
from deq_attacks.training.data_loading import (
    TrainingArrays,
    TrainingData,
    epoch_loader,
    load_training_data,
)
from deq_attacks.training.monitor import evaluate_dev
from deq_attacks.training.plots import plot_history
from deq_attacks.training.resume import RunState


@dataclass
class RunResult:
    """A finished (or already complete) run: its folder, state and final model (the last
    epoch's weights; ``best.safetensors`` holds the best epoch's), and the task it learned:
    image shape (C, H, W) and number of classes."""

    run_dir: Path
    state: RunState
    model: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int

    def load_best(self) -> nn.Module:
        """``model`` with the best epoch's weights (``best.safetensors``), in eval mode."""
        load_weights(self.model, self.run_dir / "best.safetensors")
        return self.model.eval()


class EpochParts(Protocol):
    """What the end of an epoch saves and measures: the bare model, the optimizer, the
    schedule and the acceleration (a ``StepContext``, or ART's ``ArtMadryEpochs``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    acceleration: Acceleration


@dataclass
class StepContext:
    """What one optimizer step needs besides the batch."""

    wrapped: nn.Module  # the TrainingModule, or its DistributedDataParallel wrapper
    model: nn.Module  # the bare model (adversaries are made on it, outside DDP)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    adversary: Adversary  # makes the PGD examples of a batch (``make_adversary``)
    num_classes: int
    device: torch.device
    acceleration: Acceleration
    jacobian: JacobianSchedule | None = None  # which steps carry the Jacobian penalty


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's cross-entropy, correct predictions and Jacobian penalty (None on a
    step that did not carry it)."""

    loss: float
    correct: int
    penalty: float | None


def training_step(
    ctx: StepContext,
    x: Tensor,
    y: Tensor,
    adversarial: bool,
    unrolled: bool,
    penalty: JacobianRegularization | None = None,
    solve_steps: int | None = None,
) -> StepResult:
    """One optimizer step on (x, y): PGD adversaries first if ``adversarial`` (eval mode, the
    training gradient, the full solve), then cross-entropy in train mode (the unrolled network
    if ``unrolled``; the loss at z_n if ``solve_steps`` = n; plus ``penalty`` at the same
    state, if given), backward, Adam and the schedule."""
    accel, device = ctx.acceleration, ctx.device
    if adversarial:
        with accel.autocast(device):
            x = ctx.adversary(x, y)
    ctx.wrapped.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    with accel.autocast(device):
        logits, jacobian_penalty = ctx.wrapped(accel.inputs(x), unrolled, penalty, solve_steps)
    loss = F.cross_entropy(logits.float(), y)
    total = loss if jacobian_penalty is None else loss + jacobian_penalty.float()
    total.backward()
    ctx.optimizer.step()
    ctx.schedule.step()
    return StepResult(
        float(loss.detach()),
        int((logits.detach().argmax(1) == y).sum()),
        None if jacobian_penalty is None else float(jacobian_penalty.detach()),
    )


def random_solve_steps(seed: int, global_step: int, threshold: int) -> int:
    """The intermediate state n of random-intermediate-state training at this global step:
    uniform in 1..threshold (the forward solver's; Yang et al. 2023's code draws one per step,
    the full solve included), from a generator seeded by (seed, global step), so that every
    process of a DDP run and a resumed run draw the same n."""
    rng = np.random.default_rng([seed, global_step])
    return int(rng.integers(1, threshold + 1))


def _solve_steps(
    ctx: StepContext, config: TrainConfig, global_step: int, pretraining: bool
) -> int | None:
    """The forward solve's length of a training step: a random n with ``random_state`` in DEQ
    mode, else the full solve (None)."""
    if not config.optimiser.random_state or pretraining or not isinstance(ctx.model, DEQ):
        return None
    return random_solve_steps(config.execution.seed, global_step, ctx.model.solver.threshold)


def _phase(config: TrainConfig, first_step: int, last_step: int) -> str:
    pre = first_step < config.optimiser.pretrain_steps
    post = last_step >= config.optimiser.pretrain_steps
    after = "pgd-at" if config.threat.adversarial else "clean"
    return "pretrain" if pre and not post else (f"pretrain+{after}" if pre else after)


def run_training(
    config: TrainConfig,
    run_dir: str | Path,
    log: Callable[[str], None] = print,
    data: TrainingArrays | None = None,
) -> RunResult:
    """Train as ``config`` says into ``run_dir``; a rerun with the same config and data resumes
    after the last finished epoch (a changed config or other data is refused). With
    ``config.data.source == "memory"``, ``data`` (an ImageDataset or an (x, y) pair) is the training
    pool. Works alone or under torchrun. Everything that can be checked before training is
    (the model's entry point, the data, dev_size, the model against the images), each problem
    raising one ValueError (TypeError for data of the wrong type, FileNotFoundError for
    missing data). ``config.execution.threads`` holds for the run only: torch's thread count
    is restored afterwards."""
    resolve_builder(config.model.name)  # a model entry point that does not import fails here
    threads = torch.get_num_threads()
    try:
        if config.execution.threads is not None:
            torch.set_num_threads(config.execution.threads)
        with distributed.process_group(config.execution.device.value) as processes:
            return _run(config, Path(run_dir), processes, log, data)
    finally:
        torch.set_num_threads(threads)


def _run(
    config: TrainConfig,
    run_dir: Path,
    processes: distributed.Processes,
    log: Callable[[str], None],
    arrays: TrainingArrays | None,
) -> RunResult:
    device, main = processes.device, processes.is_main
    art_madry = config.execution.trainer == "art_madry"
    if art_madry and processes.distributed:
        raise ValueError(
            "execution.trainer art_madry runs in one process (ART's trainer has no "
            "DistributedDataParallel): run it without torchrun"
        )
    data = load_training_data(config, arrays)
    steps_per_epoch = len(data) // config.optimiser.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(data)} training images of {data.name} are fewer than one batch of "
            f"{config.optimiser.batch_size} (lower batch_size or dev_size)"
        )
    if art_madry:  # ART's trainer keeps the last, smaller batch
        steps_per_epoch = art_trainer.steps_per_epoch(len(data), config.optimiser.batch_size)
    if config.optimiser.batch_size % processes.world:
        raise ValueError(
            f"batch_size {config.optimiser.batch_size} not divisible by {processes.world}"
        )
    resume.seed_everything(config.execution.seed)  # identical initial weights on every rank
    model = training_model(config, data.image_shape, data.num_classes).to(device)
    check_model_fits(model, data.dev_x[:2].to(device), data.dev_y, data.name, data.num_classes)
    acceleration = config.execution.acceleration
    acceleration.apply(model)
    optimizer, schedule = optimizer_and_schedule(
        model, config, config.optimiser.epochs * steps_per_epoch
    )
    resume.check_config(run_dir, config)
    resume.check_data(run_dir, data.fingerprint)
    distributed.barrier()
    if main:
        resume.write_config(run_dir, config)
        resume.write_data(run_dir, data.fingerprint)
    distributed.barrier()
    state = resume.read_state(run_dir)
    rng: dict[str, Any] | None = None  # the saved random streams of this rank, if resuming
    if state.checkpoint is not None:
        counters, rng = resume.restore(run_dir, state, processes.rank, model, optimizer, schedule)
        if counters["world"] != processes.world:
            raise ValueError(
                f"{run_dir} was trained by {counters['world']} processes; resume with as many "
                f"(now {processes.world})"
            )
        if main:
            log(f"resuming {run_dir} after epoch {state.epochs_done} (step {state.global_step})")
    if state.epochs_done >= config.optimiser.epochs:
        if main:
            log(f"{run_dir}: all {config.optimiser.epochs} epochs are done")
        return RunResult(run_dir, state, model, data.image_shape, data.num_classes)

    parts: EpochParts
    if art_madry:
        parts = art_trainer.art_madry(
            model, optimizer, schedule, config, data.image_shape, data.num_classes, device
        )
    else:
        parts = _step_context(config, data, model, optimizer, schedule, processes)
    if main:
        params = sum(p.numel() for p in model.parameters())
        log(
            f"training {config.model.name} ({params / 1e6:.2f}M parameters) on {data.name}: "
            f"{len(data)} images, dev {len(data.dev_y)}, {steps_per_epoch} steps/epoch x "
            f"{config.optimiser.epochs} epochs, {processes.world} process(es) on {device}"
            + (" (ART's AdversarialTrainerMadryPGD)" if art_madry else "")
        )
    # the random streams start here: per rank, fresh or as the last finished epoch left them
    if rng is not None:
        resume.set_rng_state(rng)
    else:
        resume.seed_everything(config.execution.seed + 1009 * processes.rank)
    for epoch in range(state.epochs_done, config.optimiser.epochs):
        if isinstance(parts, StepContext):
            _train_epoch(parts, config, data, epoch, state, processes, run_dir)
        else:
            _art_epoch(parts, config, data, epoch, state, run_dir)
        _finish_epoch(parts, config, data, epoch, state, processes, run_dir, log)
    return RunResult(run_dir, state, model, data.image_shape, data.num_classes)


def _step_context(
    config: TrainConfig,
    data: TrainingData,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    processes: distributed.Processes,
) -> StepContext:
    """This loop's steps: the training module (DDP-wrapped under torchrun) and the adversary."""
    device = processes.device
    module = TrainingModule(model, config.optimiser.pretrain_depth)
    wrapped: nn.Module = module
    if processes.distributed:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(module, device_ids=ids)
    local_batch = config.optimiser.batch_size // processes.world
    budget = Budget(
        config.threat.eps,
        config.threat.step,
        config.threat.steps,
        config.threat.random_start,
        config.threat.norm,
    )
    adversary = make_adversary(
        config.threat.adversary,
        model,
        budget,
        data.image_shape,
        data.num_classes,
        device,
        local_batch,
    )
    return StepContext(
        wrapped,
        model,
        optimizer,
        schedule,
        adversary,
        data.num_classes,
        device,
        config.execution.acceleration,
        jacobian_schedule(config),
    )


class NonFiniteTrainingError(ValueError):
    """A step's loss or the weights after it are not finite: the run stops there (nothing of
    the unfinished epoch is saved; the last finished epoch's checkpoint stays)."""


def check_finite_step(
    model: nn.Module, result: StepResult, state: RunState, epoch: int, run_dir: Path
) -> None:
    """Raise ``NonFiniteTrainingError`` naming the step (``state.global_step`` + 1) if its
    loss or penalty, or any weight after the optimizer step, is NaN or infinite."""
    losses = [result.loss] + ([result.penalty] if result.penalty is not None else [])
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if all(math.isfinite(v) for v in losses) and not bad:
        return
    what = (
        f"the loss is {result.loss}"
        if not math.isfinite(result.loss)
        else f"the Jacobian penalty is {result.penalty}"
        if not all(math.isfinite(v) for v in losses)
        else f"{len(bad)} weight tensor(s) are not finite after the update ({bad[0]}, ...)"
    )
    kept = (
        f"the last good checkpoint, {run_dir / 'checkpoints' / state.checkpoint} (after epoch "
        f"{state.epochs_done}), is kept: rerun to resume from it, e.g. with a lower lr"
        if state.checkpoint is not None
        else "no epoch had finished, so there is no checkpoint to resume from"
    )
    raise NonFiniteTrainingError(
        f"training stopped at step {state.global_step + 1} (epoch {epoch + 1}): {what}; {kept}"
    )


def _train_epoch(
    ctx: StepContext,
    config: TrainConfig,
    data: TrainingData,
    epoch: int,
    state: RunState,
    processes: distributed.Processes,
    run_dir: Path,
) -> None:
    deq = isinstance(ctx.model, DEQ)
    loader = epoch_loader(
        data,
        config,
        epoch,
        processes.rank,
        processes.world,
        pin=processes.device.type == "cuda",
    )
    first_step = state.global_step
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
    penalties: list[float] = []
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not processes.is_main)
    for x, y in bar:
        x = x.to(processes.device, non_blocking=True)
        y = y.to(processes.device, non_blocking=True)
        pretraining = state.global_step < config.optimiser.pretrain_steps
        schedule = ctx.jacobian
        carries = schedule is not None and schedule.applies(state.global_step, epoch)
        result = training_step(
            ctx,
            x,
            y,
            adversarial=config.threat.adversarial and not pretraining,
            unrolled=pretraining and deq,
            penalty=schedule.regularization if schedule is not None and carries else None,
            solve_steps=_solve_steps(ctx, config, state.global_step, pretraining),
        )
        check_finite_step(ctx.model, result, state, epoch, run_dir)
        if result.penalty is not None:
            penalties.append(result.penalty)
        totals += torch.tensor([result.loss * len(y), result.correct, len(y)], dtype=torch.float64)
        state.global_step += 1
    seconds = time.perf_counter() - start
    totals = distributed.sum_over_processes(totals.to(processes.device)).cpu()
    _record_epoch(
        state, config, epoch, first_step, ctx.schedule,
        float(totals[0] / totals[2]), float(totals[1] / totals[2]),
        sum(penalties) / len(penalties) if penalties else None, float(totals[2]), seconds,
    )  # fmt: skip


def _record_epoch(
    state: RunState,
    config: TrainConfig,
    epoch: int,
    first_step: int,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    loss: float,
    accuracy: float,
    penalty: float | None,
    samples: float,
    seconds: float,
) -> None:
    """Append epoch ``epoch``'s training record to ``state.history`` (its steps ran from
    ``first_step`` to ``state.global_step - 1``): the learning rate ``schedule`` ended at,
    mean loss and accuracy, the mean Jacobian penalty (None: not computed), throughput and
    wall seconds."""
    state.history.append(
        {
            "epoch": epoch + 1,
            "global_step": state.global_step,
            "phase": _phase(config, first_step, state.global_step - 1),
            "lr": schedule.get_last_lr()[0],
            "train_loss": loss,
            "train_accuracy": accuracy,
            "jacobian_penalty": penalty,
            "samples_per_s": samples / seconds,
            "train_seconds": seconds,
        }
    )


def _art_epoch(
    parts: art_trainer.ArtMadryEpochs,
    config: TrainConfig,
    data: TrainingData,
    epoch: int,
    state: RunState,
    run_dir: Path,
) -> None:
    """One epoch of ART's trainer, recorded as ``_train_epoch`` records one of this loop's
    (the loss and weights checked for NaN at the epoch's end: ART owns the steps)."""
    start = time.perf_counter()
    totals = parts.fit_epoch(data.train, epoch)
    seconds = time.perf_counter() - start
    check_finite_step(parts.model, StepResult(totals.loss, totals.correct, None), state, epoch,
                      run_dir)  # fmt: skip
    first_step = state.global_step
    state.global_step += totals.steps
    _record_epoch(
        state, config, epoch, first_step, parts.schedule, totals.loss,
        totals.correct / totals.samples, None, totals.samples, seconds,
    )  # fmt: skip


def _finish_epoch(
    ctx: EpochParts,
    config: TrainConfig,
    data: TrainingData,
    epoch: int,
    state: RunState,
    processes: distributed.Processes,
    run_dir: Path,
    log: Callable[[str], None],
) -> None:
    record = state.history[-1]
    improved = False
    if processes.is_main:
        start = time.perf_counter()
        record.update(
            evaluate_dev(
                ctx.model,
                data.dev_x,
                data.dev_y,
                config,
                data.num_classes,
                processes.device,
                ctx.acceleration,
            )
        )
        record["dev_seconds"] = time.perf_counter() - start
        best = state.best_dev_pgd_accuracy
        improved = best is None or record["dev_pgd_accuracy"] > best
        if improved:
            state.best_epoch, state.best_dev_pgd_accuracy = epoch + 1, record["dev_pgd_accuracy"]
    state.epochs_done = epoch + 1
    with resume.writing_checkpoint(run_dir, epoch + 1, state):
        staging = resume.staging_dir(run_dir, epoch + 1)
        distributed.barrier()
        resume.save_rng(staging, processes.rank)
        if processes.is_main:
            counters = {"world": processes.world}
            resume.save_trainer(staging, ctx.model, ctx.optimizer, ctx.schedule, counters)
        distributed.barrier()
        if processes.is_main:
            if improved:
                resume.save_best(run_dir, ctx.model)
            resume.write_metrics(run_dir, state.history)
            if config.execution.plots:
                plot_history(
                    state.history,
                    run_dir / "training.png",
                    eps=config.threat.eps if config.threat.adversarial else None,
                    title=f"{config.model.name} on {config.data.source}",
                )
            resume.publish(run_dir, epoch + 1, state)
    if processes.is_main:
        log(_summary(record, config.optimiser.epochs))
    distributed.barrier()


def _summary(record: dict[str, Any], epochs: int) -> str:
    parts = [
        f"epoch {record['epoch']}/{epochs} [{record['phase']}]",
        f"loss {record['train_loss']:.3f}",
        f"train acc {record['train_accuracy']:.1%}",
        f"dev clean {record['dev_clean_accuracy']:.1%}",
        f"dev PGD {record['dev_pgd_accuracy']:.1%}",
    ]
    if "dev_residuals" in record:
        parts.append(f"residual z_N {record['dev_residuals'][-1]:.3f}")
    if "dev_spectral_radius" in record:
        parts.append(f"rho(J_f) {record['dev_spectral_radius']:.2f}")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    return ", ".join(parts)
