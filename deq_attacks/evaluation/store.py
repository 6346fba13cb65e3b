"""Per-sample results on disk under a fingerprint of the settings, the weights and the data,
so that an interrupted or finished evaluation resumes and a changed one starts afresh.

The store is its own file (JSON lines, not the report): the first line is the fingerprint, each
further line one finished step or one finished block of a step, appended as soon as it is done
(an interrupt loses at most the block being computed). A line cut short by an interrupt is
dropped when the file is read again. Only rank 0 reads and writes; the other processes receive
its content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


_Loaded = tuple[dict[str, Any], dict[str, dict[int, Any]], bool, list[str]]


def _read(path: Path, fingerprint: dict[str, Any]) -> _Loaded:
    """(finished steps, finished blocks of unfinished steps, whether the file matched, the
    parts of the fingerprint in which an existing store differs)."""
    steps: dict[str, Any] = {}
    blocks: dict[str, dict[int, Any]] = {}
    if not path.exists():
        return steps, blocks, False, []
    lines = path.read_text().splitlines()
    if not lines:
        return steps, blocks, False, []
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
        return steps, blocks, False, differs
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line, cut by an interrupt
            break
        key = record["key"]
        if "block" in record:
            blocks.setdefault(key, {})[int(record["block"])] = record["value"]
        else:
            steps[key] = record["value"]
            blocks.pop(key, None)
    return steps, blocks, True, []


class ResultStore:
    """The steps and blocks finished so far, in a JSON-lines file under a fingerprint; a file
    written under another fingerprint (settings, weights or data) is not reused: it is started
    afresh, and ``replaced`` names the parts of the fingerprint that differed (empty when
    nothing was replaced)."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], shards: Shards) -> None:
        self.path, self.shards = path, shards
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        loaded: _Loaded = ({}, {}, False, [])
        if path is not None and shards.is_main:
            loaded = _read(path, self.fingerprint)
        shared = broadcast_object(loaded)
        self.steps: dict[str, Any] = shared[0]
        self.partial: dict[str, dict[int, Any]] = shared[1]
        self.resumed: bool = shared[2]
        self.replaced: list[str] = shared[3]
        self._rewrite()

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
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.path)

    def _append(self, record: dict[str, Any]) -> None:
        if not self._writes():
            return
        assert self.path is not None
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


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
