"""Settings as plain JSON records: what result files and run folders write (``config.json``,
the evaluation's fingerprint and settings), and what ``TrainConfig.from_json`` reads back."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

__all__ = ["plain", "to_jsonable"]


def plain(value: Any) -> Any:
    """``value`` as plain JSON values: enums by value, paths as strings, dataclasses as dicts,
    recursively through lists, tuples and dicts."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def to_jsonable(config: Any) -> dict[str, Any]:
    """A dataclass as a dict of plain JSON values (``plain``)."""
    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
