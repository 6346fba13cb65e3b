"""Exact resume: what a run folder holds after each finished epoch, written so that a kill at any
moment leaves either the previous epoch's state or the new one, never a mix.

Layout of a run folder::

    config.json             the TrainConfig (written once, before any work)
    data.json               the training pool's fingerprint (name, images, SHA-256)
    state.json              RunState: epochs done, global step, best epoch, history; points to
    checkpoints/epoch-NNNN/ model.safetensors, trainer.pt (optimizer, scheduler, process count) and
                            rng-rank<r>.pt (torch, CUDA, numpy and Python RNG states per rank)
    best.safetensors        the weights of the best epoch by development PGD accuracy
    metrics.jsonl, training.png

An epoch's checkpoint folder is written under a temporary name and renamed when complete; then
``state.json`` is replaced atomically (the state last); then older checkpoint folders go. A write
that fails (a full disk) raises ``CheckpointWriteError`` and leaves the last good checkpoint as
it was. Resuming refuses, in one line each, a file whose SHA-256 differs from the one recorded in
``state.json`` when it was published, a damaged part (an empty, truncated or pickle-with-code
``trainer.pt`` or ``rng-rank<r>.pt``) and a checkpoint holding NaN or infinite values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deq_attacks.checkpoints import CheckpointError, load_weights, save_weights
from deq_attacks.records import to_jsonable
from deq_attacks.training.config import TrainConfig


class ConfigMismatchError(ValueError):
    """The run folder was started with another configuration."""


class CheckpointWriteError(ValueError):
    """An epoch's checkpoint could not be written (e.g. a full disk); the last good one stays."""


@dataclass
class RunState:
    """What ``state.json`` records (history: one dict per finished epoch)."""

    epochs_done: int = 0
    global_step: int = 0
    best_epoch: int | None = None
    best_dev_pgd_accuracy: float | None = None
    checkpoint: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)
    """SHA-256 of each file of the checkpoint, recorded when it was published."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_config(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a run folder that was started with another configuration, naming every
    differing key (run-only keys such as threads may differ)."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    saved = TrainConfig.from_json(json.loads(path.read_text()))
    differences = saved.differences(config)
    if differences:
        raise ConfigMismatchError(
            f"{run_dir} was started with another configuration; resuming under a changed one "
            f"would not reproduce the run. Differences (saved -> now): {'; '.join(differences)}."
            " Use a new --out-dir, or the saved settings."
        )


def write_config(run_dir: Path, config: TrainConfig) -> None:
    """Record ``config`` as ``config.json`` (after ``check_config``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(to_jsonable(config), indent=2) + "\n")


def check_data(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a run folder whose training pool had other contents."""
    path = run_dir / "data.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    if saved != fingerprint:
        raise ConfigMismatchError(
            f"{run_dir} was trained on other data ({saved['name']}, {saved['images']} images, "
            f"sha256 {saved['sha256'][:12]}...; now {fingerprint['name']}, "
            f"{fingerprint['images']} images, sha256 {fingerprint['sha256'][:12]}...). Use a "
            "new --out-dir, or the same data."
        )


def write_data(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Record the training pool's fingerprint as ``data.json`` (after ``check_data``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "data.json", json.dumps(fingerprint, indent=2) + "\n")


def read_state(run_dir: Path) -> RunState:
    path = run_dir / "state.json"
    if not path.exists():
        return RunState()
    return RunState(**json.loads(path.read_text()))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def writing_checkpoint(run_dir: Path, epoch: int, state: RunState) -> Iterator[None]:
    """Writing epoch ``epoch``'s checkpoint inside: a failed write (an ``OSError``, or torch's
    ``RuntimeError`` from its zip writer, as on a full disk) becomes one
    ``CheckpointWriteError`` line naming the last good checkpoint, which stays as it was."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        text = str(error)
        if isinstance(error, RuntimeError) and not any(m in text for m in _TORCH_WRITE_ERRORS):
            raise
        kept = read_state(run_dir).checkpoint
        where = f"{run_dir / 'checkpoints' / kept} is kept" if kept else "no epoch was saved"
        first = text.strip().splitlines()[0][:160] if text.strip() else type(error).__name__
        raise CheckpointWriteError(
            f"cannot write the checkpoint of epoch {epoch} in {run_dir} ({first}); the last "
            f"good checkpoint {where}: make room and rerun to resume"
        ) from None


#: Parts of torch.save's messages when its file cannot be written (e.g. a full disk).
_TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "unexpected pos", "write")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def staging_dir(run_dir: Path, epoch: int) -> Path:
    """Where every rank writes epoch ``epoch``'s checkpoint before it is published."""
    path = run_dir / "checkpoints" / (checkpoint_name(epoch) + ".tmp")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_rng(staging: Path, rank: int) -> None:
    torch.save(rng_state(), staging / f"rng-rank{rank}.pt")


def save_trainer(
    staging: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    counters: dict[str, int],
) -> None:
    """Rank 0's part: weights, optimizer, scheduler and counters."""
    save_weights(model, staging / "model.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "counters": counters,
        },
        staging / "trainer.pt",
    )


def publish(run_dir: Path, epoch: int, state: RunState) -> None:
    """Rank 0, after every rank saved: rename the staging folder, then write ``state.json``,
    then delete older checkpoints."""
    folder = run_dir / "checkpoints"
    final = folder / checkpoint_name(epoch)
    if final.exists():  # a previous attempt renamed it but died before state.json
        shutil.rmtree(final)
    os.replace(folder / (checkpoint_name(epoch) + ".tmp"), final)
    state.checkpoint = final.name
    state.checksums = {f.name: sha256_file(f) for f in sorted(final.iterdir()) if f.is_file()}
    atomic_write_text(run_dir / "state.json", json.dumps(asdict(state), indent=2) + "\n")
    for old in folder.iterdir():
        if old.name != final.name:
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def restore(
    run_dir: Path,
    state: RunState,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Load the checkpoint ``state`` names into the objects; returns the saved counters and
    this rank's RNG states (for ``set_rng_state`` just before training goes on)."""
    if state.checkpoint is None:
        raise ValueError("the run state names no checkpoint")
    folder = run_dir / "checkpoints" / state.checkpoint
    for name in ("model.safetensors", "trainer.pt", f"rng-rank{rank}.pt"):
        check_checksum(folder / name, state.checksums.get(name))
    load_weights(model, folder / "model.safetensors")
    trainer = _load(folder / "trainer.pt", ("optimizer", "scheduler", "counters"))
    rng_file = folder / f"rng-rank{rank}.pt"
    if not rng_file.exists():
        raise ValueError(
            f"{folder} has no RNG state for rank {rank}: resume with the number of processes "
            "that wrote it"
        )
    rng = _load(rng_file, ("torch", "numpy", "python"))
    try:
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        counters = dict(trainer["counters"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{folder / 'trainer.pt'} does not fit this run: {error}") from None
    check_finite(folder, model, optimizer)
    return counters, rng


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_checksum(path: Path, expected: str | None) -> None:
    """Refuse a checkpoint file whose bytes changed since it was published (flipped bytes, a
    copy cut short); ``expected`` None (a run from before checksums were kept) checks nothing."""
    if expected is None or not path.exists():
        return
    if sha256_file(path) != expected:
        raise CheckpointError(
            f"{path} does not match the SHA-256 recorded when it was written (changed bytes, "
            "or a copy cut short): it cannot be resumed; restore it, or start afresh in a new "
            "--out-dir"
        )


def _load(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A ``torch.save`` dict of a checkpoint (weights only), with ``keys``; a missing, empty,
    truncated or code-carrying file raises one ``CheckpointError`` line."""
    try:
        with warnings.catch_warnings():  # torch's warnings about the pickle: the error says it
            warnings.simplefilter("ignore")
            value = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle, zip, EOF, OS errors: all mean "damaged"
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path} cannot be read ({type(error).__name__}{': ' + first[:120] if first else ''})"
            ": the checkpoint is damaged; restore it, or start afresh in a new --out-dir"
        ) from None
    if not isinstance(value, dict) or not set(keys) <= set(value):
        raise CheckpointError(
            f"{path} is not a training checkpoint part (expected a dict with "
            f"{', '.join(keys)}): restore it, or start afresh in a new --out-dir"
        )
    return value


def check_finite(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a checkpoint whose weights, buffers or optimizer state hold NaN or infinity
    (resuming would train on garbage), naming the first such tensor."""
    named = [(f"weight {k}", v) for k, v in model.state_dict().items()]
    for index, per_param in optimizer.state.items():
        named += [(f"optimizer state {k} of parameter {index}", v) for k, v in per_param.items()]
    for name, tensor in named:
        floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        if floating and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{folder} holds non-finite values ({name}): it cannot be resumed; "
                "restore it, or start afresh in a new --out-dir"
            )


def save_best(run_dir: Path, model: nn.Module) -> None:
    """``best.safetensors``, replaced atomically."""
    tmp = run_dir / "best.safetensors.tmp"
    save_weights(model, tmp)
    os.replace(tmp, run_dir / "best.safetensors")


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON object per finished epoch."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
