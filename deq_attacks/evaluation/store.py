"""Per-sample results on disk under a fingerprint of the settings, the weights and the data,
so that an interrupted or finished evaluation resumes and a changed one starts afresh.

The store is its own file (JSON lines, not the report): the first line is the fingerprint, each
further line one finished step or one finished block of a step, appended as soon as it is done
(an interrupt loses at most the block being computed). A line cut short by an interrupt, or a
line that is not a record, is dropped when the file is read again (its step is recomputed). A
store written under another fingerprint is moved aside under that fingerprint's hash, never
overwritten, and moved back when a run with that fingerprint comes again. One process writes a
store at a time (a ``filelock`` beside it; the holder's pid and host are named to a second
one). A failed write (a full disk) raises ``StoreWriteError`` and leaves what was written
before readable. Only rank 0 reads and writes; the other processes receive its content.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from deq_attacks.distributed import broadcast_object
from deq_attacks.evaluation.distributed import Shards


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of the state dict (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_hash(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays (shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}:{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class StoreBusyError(RuntimeError):
    """Another process holds the store's lock (it is evaluating into the same out-dir)."""


class StoreWriteError(OSError):
    """A write to the store failed (e.g. a full disk); what was written before is kept."""


def lock_path(path: Path) -> Path:
    """The lock file of the store ``path`` (its holder is described in ``<lock>.holder``)."""
    return path.with_name(path.name + ".lock")


def lock_store(path: Path) -> FileLock:
    """Acquire the store's lock (reentrant within a process) and record its holder (pid,
    host, since when); another process holding it raises ``StoreBusyError`` naming it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(path)), timeout=0, is_singleton=True)
    holder = lock_path(path).with_name(lock_path(path).name + ".holder")
    try:
        lock.acquire()
    except Timeout:
        try:
            who = holder.read_text().strip()
        except OSError:
            who = "a process that did not record itself"
        raise StoreBusyError(
            f"{path} is being written by another run ({who}): wait for it to finish, or give "
            "another output folder"
        ) from None
    if lock.lock_counter == 1:
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        with contextlib.suppress(OSError):  # the lock holds; only its description is missing
            holder.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
    return lock


def aside_path(path: Path, header: Any) -> Path:
    """Where the store ``path`` with first line ``header`` is kept when another fingerprint
    takes its place: ``<stem>.<first 12 hex of the header's SHA-256><suffix>``."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:12]
    return path.with_name(f"{path.stem}.{digest}{path.suffix}")


def moved_aside(path: Path, header: Any) -> Path:
    """Rename the store ``path`` whose first line is ``header`` (another fingerprint) to
    ``aside_path`` (or a free name beside it) and return the new path."""
    target = aside_path(path, header)
    digest = target.stem.rsplit(".", 1)[-1]
    number = 1
    while target.exists():
        target = path.with_name(f"{path.stem}.{digest}-{number}{path.suffix}")
        number += 1
    path.replace(target)
    return target


_Loaded = tuple[dict[str, Any], dict[str, dict[int, Any]], bool, list[str], list[str]]


def _read(path: Path, fingerprint: dict[str, Any]) -> _Loaded:
    """(finished steps, finished blocks of unfinished steps, whether the file matched, the
    parts of the fingerprint in which an existing store differs, problems with its lines)."""
    steps: dict[str, Any] = {}
    blocks: dict[str, dict[int, Any]] = {}
    if not path.exists():
        return steps, blocks, False, [], []
    lines = path.read_text().splitlines()
    if not lines:
        return steps, blocks, False, [], []
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or "fingerprint" not in header:
        raise ValueError(
            f"{path} is not a result store (its first line is no fingerprint): give another "
            "store path (the report's results.json is not the store)"
        )
    if header["fingerprint"] != fingerprint:
        old = header["fingerprint"] if isinstance(header["fingerprint"], dict) else {}
        differs = sorted(k for k in {*old, *fingerprint} if old.get(k) != fingerprint.get(k))
        return steps, blocks, False, differs, []
    problems = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):  # the last line may be cut by an interrupt: no problem
                problems.append(f"line {number} is not JSON")
            continue
        if not _is_record(record):
            problems.append(f"line {number} is not a record ({line[:60]!r})")
            continue
        key = record["key"]
        if "block" in record:
            blocks.setdefault(key, {})[int(record["block"])] = record["value"]
        else:
            steps[key] = record["value"]
            blocks.pop(key, None)
    return steps, blocks, True, [], problems


def _is_record(record: Any) -> bool:
    """``{"key": str, "value": ...}`` with an optional int ``"block"``, nothing else."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("key"), str)
        and "value" in record
        and set(record) <= {"key", "value", "block"}
        and (type(record.get("block", 0)) is int)
    )


class ResultStore:
    """The steps and blocks finished so far, in a JSON-lines file under a fingerprint, locked
    against other processes from construction to ``close`` (a context manager; rank 0).

    A file written under another fingerprint (settings, weights or data) is not reused: it is
    moved aside (``moved_to``, ``moved_aside``) and the store starts afresh, or from this
    fingerprint's own store if one was moved aside before (``aside_path``: it is moved back);
    ``replaced`` names the parts of the fingerprint that differed (empty when nothing was
    moved).
    ``problems`` names the lines that were dropped (not JSON, or not a record): their steps
    are recomputed."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], shards: Shards) -> None:
        self.path, self.shards = path, shards
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self._lock: FileLock | None = None
        loaded: _Loaded = ({}, {}, False, [], [])
        moved: Path | None = None
        failure: Exception | None = None
        if path is not None and shards.is_main:
            try:
                self._lock = lock_store(path)
                loaded = _read(path, self.fingerprint)
                if loaded[3]:
                    moved = moved_aside(path, json.loads(path.read_text().splitlines()[0]))
                kept = aside_path(path, {"fingerprint": self.fingerprint})
                if not loaded[2] and kept.exists():  # this fingerprint's store, kept before
                    kept.replace(path)
                    loaded = _read(path, self.fingerprint)
            except (StoreBusyError, ValueError, OSError) as error:
                failure = error
        shared = broadcast_object((loaded, moved, failure))
        if shared[2] is not None:
            self.close()
            raise shared[2]
        loaded, self.moved_to = shared[0], shared[1]
        self.steps: dict[str, Any] = loaded[0]
        self.partial: dict[str, dict[int, Any]] = loaded[1]
        self.resumed: bool = loaded[2]
        self.replaced: list[str] = loaded[3]
        self.problems: list[str] = loaded[4]
        try:
            self._rewrite()
        except StoreWriteError:
            self.close()
            raise

    def close(self) -> None:
        """Release the lock (the file stays)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def get(self, key: str) -> Any:
        """The finished step ``key`` (None if not finished)."""
        return self.steps.get(key)

    def put(self, key: str, value: Any) -> Any:
        """Record step ``key`` as finished; returns its JSON form."""
        self.steps[key] = jsonable(value)
        self.partial.pop(key, None)
        self._append({"key": key, "value": self.steps[key]})
        return self.steps[key]

    def blocks(self, key: str) -> dict[int, Any]:
        """The finished blocks of the unfinished step ``key``, by block number."""
        return dict(self.partial.get(key, {}))

    def put_block(self, key: str, number: int, value: Any) -> None:
        """Record block ``number`` of step ``key`` as finished."""
        self.partial.setdefault(key, {})[number] = jsonable(value)
        self._append({"key": key, "block": number, "value": self.partial[key][number]})

    def _writes(self) -> bool:
        return self.path is not None and self.shards.is_main

    def _rewrite(self) -> None:
        """The file as header + what was read (drops a cut line and superseded blocks)."""
        if not self._writes():
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = [{"key": k, "value": v} for k, v in self.steps.items()]
        records += [
            {"key": k, "block": n, "value": v}
            for k, per in self.partial.items()
            for n, v in per.items()
        ]
        tmp = self.path.with_name(self.path.name + ".tmp")
        lines = [json.dumps({"fingerprint": self.fingerprint})] + [json.dumps(r) for r in records]
        try:
            with tmp.open("w") as file:
                file.write("\n".join(lines) + "\n")
            tmp.replace(self.path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise self._failed(error) from None

    def _append(self, record: dict[str, Any]) -> None:
        if not self._writes():
            return
        assert self.path is not None
        try:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            raise self._failed(error) from None

    def _failed(self, error: OSError) -> StoreWriteError:
        return StoreWriteError(
            error.errno,
            f"cannot write the result store {self.path} ({error.strerror or error}); what was "
            "written before is kept: make room and run again to resume",
        )


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars turned into plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value
