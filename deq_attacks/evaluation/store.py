"""Per-sample results on disk under a fingerprint of the settings, the weights and the data,
so that an interrupted evaluation resumes and a changed one starts afresh."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


class ResultStore:
    """The per-sample results finished so far, in a JSON file under a fingerprint; a file
    written under another fingerprint (settings, weights or data) is not reused. Only rank 0
    writes."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], shards: Shards) -> None:
        self.path, self.shards = path, shards
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.data: dict[str, Any] = {"fingerprint": self.fingerprint, "steps": {}}
        self.resumed = False
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == self.fingerprint:
                self.data["steps"] = saved.get("steps", {})
                self.resumed = True

    def get(self, key: str) -> Any:
        return self.data["steps"].get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data["steps"][key] = jsonable(value)
        self.save()
        return self.data["steps"][key]

    def save(self) -> None:
        if self.path is not None and self.shards.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)


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
