"""Model checkpoints: the files people have, read without running code, checked against the model.

Formats (recognised by their first bytes, not their names): safetensors, and ``torch.save``
files (``.pt``/``.pth``/``.bin``/``.pth.tar``/``.ckpt``, zip or legacy) read with
``torch.load(weights_only=True)``, which refuses any pickle that needs code: nothing in a
checkpoint is ever executed. A training checkpoint's usual container (``state_dict``,
``model_state_dict``, ``model``, ``net``) is opened, a DataParallel ``module.`` (or
torch.compile ``_orig_mod.``) prefix on every key removed, and the result says which.

Keys of a user's own module are renamed by a :class:`KeyMap` (prefix rules such as
``"encoder.=injection."``, applied in order) and/or a filter function
``(state_dict, model) -> state_dict`` (timm's ``pretrained_filter_fn`` style, e.g.
``deq_attacks.adapters.convert_mdeq_state_dict``). One checker, :func:`check_fits`, lists
every missing key, unexpected key and shape mismatch before anything is loaded.

Every problem is a :class:`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CONTAINER_KEYS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "FilterFn",
    "KeyMap",
    "check_fits",
    "load_weights",
    "read_checkpoint",
    "save_weights",
]

#: Entries of a training checkpoint that may hold the state dict, tried in this order.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
#: Prefixes that wrappers put on every key: removed when every key has one.
WRAPPER_PREFIXES = {"module.": "DataParallel", "_orig_mod.": "torch.compile"}

FilterFn = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
"""``(state_dict, model) -> state_dict`` (timm's ``pretrained_filter_fn``)."""

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what is wrong."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model; the message lists the keys and shapes."""


@dataclass(frozen=True)
class Checkpoint:
    """A state dict and where it came from.

    Attributes:
        state: parameter and buffer name -> tensor (on the CPU).
        source: the file (or ``"<state dict>"`` for one given in memory).
        format: ``"safetensors"``, ``"torch"`` (``torch.save``) or ``"mapping"``.
        entry: the container entry used (``"state_dict"``, ...), or None for a bare state dict.
        changes: what was done to the keys, in order (prefix removed, key map, filter).
    """

    state: dict[str, Tensor]
    source: str
    format: str
    entry: str | None = None
    changes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line: ``"w.pt (torch, entry 'state_dict', DataParallel prefix 'module.'
        removed): 12 tensors"``."""
        parts = [self.format]
        if self.entry is not None:
            parts.append(f"entry {self.entry!r}")
        parts.extend(self.changes)
        return f"{self.source} ({', '.join(parts)}): {len(self.state)} tensors"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > _LISTED else "")


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the model's state dict (parameters and buffers) to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


# --- reading --------------------------------------------------------------------------------


def _refused_globals(message: str) -> str:
    """What a weights-only unpickler refused, from torch's message."""
    found = re.findall(r"GLOBAL ([\w.]+)", message)
    if found:
        return "it refers to " + ", ".join(dict.fromkeys(found))
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", message, re.DOTALL)
    first = detail.group(1).strip().splitlines()[0] if detail else ""
    return first or "content other than tensors"


def _first_sentence(error: Exception) -> str:
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the load is refused or fine
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported operand" in str(error) and not zipfile.is_zipfile(path):
            # torch.load reads a file that is no zip archive as torch's legacy format, whose
            # unpickler stops at the first opcode of a newer pickle protocol (pickle.dump)
            raise CheckpointError(
                f"checkpoint {path}: a plain pickle file (pickle.dump), not one written by "
                "torch.save or safetensors; pickles are not read here (they can run code): "
                "save model.state_dict() with torch.save or safetensors"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: a pickle that needs code to load "
            f"({_refused_globals(str(error))}); no code from a checkpoint is run here, only "
            "tensors are read (torch.load(weights_only=True)): save model.state_dict() with "
            "torch.save or safetensors"
        ) from None
    except Exception as error:  # any reader failure is one clear message
        raise CheckpointError(
            f"checkpoint {path}: corrupt or truncated torch.save file ({_first_sentence(error)})"
        ) from None


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # SafetensorError and OS errors alike
        raise CheckpointError(
            f"checkpoint {path}: corrupt or truncated safetensors file ({_first_sentence(error)})"
        ) from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _kinds(obj: Mapping[object, object]) -> str:
    return _listing([f"{k} ({type(v).__name__})" for k, v in obj.items()])


def _unwrap(obj: object, source: str, format: str) -> Checkpoint:
    """The state dict inside ``obj``: the object itself or a container entry."""
    entry = None
    if not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint {source}: holds a {type(obj).__name__}, not a state dict "
                "(a mapping of names to tensors)"
            )
        found = [k for k in CONTAINER_KEYS if _is_state_dict(obj.get(k))]
        if not found:
            raise CheckpointError(
                f"checkpoint {source}: holds no state dict: its entries are {_kinds(obj)}; "
                f"expected names -> tensors, or one of the entries {', '.join(CONTAINER_KEYS)} "
                "holding them"
            )
        entry = found[0]
        obj = obj[entry]
    assert isinstance(obj, Mapping)
    state = dict(obj)
    if not state:
        raise CheckpointError(f"checkpoint {source}: the state dict is empty")
    changes: list[str] = []
    for prefix, wrapper in WRAPPER_PREFIXES.items():
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            changes.append(f"{wrapper} prefix {prefix!r} removed")
    return Checkpoint(state, source, format, entry, tuple(changes))


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file begins with its JSON header's length (8 bytes, little endian)."""
    length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + length <= size


def read_checkpoint(source: str | Path | Mapping[str, object]) -> Checkpoint:
    """The state dict of a file (safetensors or ``torch.save``) or of an in-memory mapping.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: empty, corrupt or truncated files, pickles that need code (never run),
            files that hold no state dict; the message names the file and the problem.
    """
    if isinstance(source, Mapping):
        return _unwrap(source, "<state dict>", "mapping")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with path.open("rb") as file:
        head = file.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    if _looks_like_safetensors(head, path.stat().st_size):
        return _unwrap(_safetensors_load(path), str(path), "safetensors")
    if head.startswith(_ZIP_MAGIC) or head[:1] == _PICKLE_PROTO:
        return _unwrap(_torch_load(path), str(path), "torch")
    raise CheckpointError(
        f"checkpoint {path}: neither a safetensors nor a torch.save file (it begins with "
        f"{head[:8]!r})"
    )


# --- renaming -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMap:
    """Prefix renames ``(old, new)``, applied in order, each to the keys the earlier ones
    produced; also usable as a filter function ``(state_dict, model) -> state_dict``.

    ``KeyMap.parse(["encoder.=injection.", "layer.=f."])``; ``"backbone.="`` drops a prefix.
    A rule that matches no key, and two keys renamed to one, are errors.
    """

    rules: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("a KeyMap needs at least one rule OLD=NEW")
        for rule in self.rules:
            if (
                not isinstance(rule, tuple)
                or len(rule) != 2
                or not all(isinstance(part, str) for part in rule)
                or not rule[0]
            ):
                raise ValueError(
                    f"a key map rule is (old prefix, new prefix), old non-empty; got {rule!r}"
                )

    @classmethod
    def parse(cls, items: Iterable[str]) -> KeyMap:
        """Rules from ``"OLD=NEW"`` strings (the command line's ``--model.key_map``)."""
        rules = []
        for item in items:
            old, sep, new = item.partition("=")
            if not sep or not old:
                raise ValueError(
                    f"a key map rule is OLD=NEW (a key prefix and its new name), got {item!r}"
                )
            rules.append((old, new))
        return cls(tuple(rules))

    def __str__(self) -> str:
        return ", ".join(f"{old}={new}" for old, new in self.rules)

    def rename(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[int]]:
        """The renamed state dict and the number of keys each rule renamed."""
        out = dict(state)
        counts = []
        for old, new in self.rules:
            renamed: dict[str, Tensor] = {}
            hits = 0
            for key, value in out.items():
                matches = key.startswith(old)
                target = new + key[len(old) :] if matches else key
                hits += matches
                if target in renamed:
                    raise CheckpointError(
                        f"key map rule {old}={new} renames two keys to {target!r}"
                    )
                renamed[target] = value
            if not hits:
                starts = sorted({k.split(".", 1)[0] + "." for k in out})
                raise CheckpointError(
                    f"key map rule {old}={new} matches no key (keys begin with {_listing(starts)})"
                )
            out = renamed
            counts.append(hits)
        return out, counts

    def __call__(self, state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        """As a filter function."""
        return self.rename(state)[0]


# --- checking and loading -------------------------------------------------------------------


def _prefixes(keys: Iterable[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] + "." for k in keys})


def check_fits(state: Mapping[str, Tensor], model: nn.Module, source: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly ``model``'s keys with
    its shapes; the message lists every unexpected key, missing key and shape mismatch."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    shapes = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    problems = []
    if unexpected:
        problems.append(f"checkpoint keys with no place in the model: {_listing(unexpected)}")
    if missing:
        problems.append(f"model keys missing from the checkpoint: {_listing(missing)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if not problems:
        return
    hint = ""
    if unexpected and missing:
        hint = (
            f" (checkpoint keys begin with {_listing(_prefixes(unexpected))}, the model's with "
            f"{_listing(_prefixes(missing))}: a key map OLD=NEW, --model.key_map on the command "
            "line, renames prefixes)"
        )
    raise CheckpointMismatchError(
        f"checkpoint {source} does not fit the model: " + "; ".join(problems) + hint
    )


def load_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, object],
    *,
    key_map: KeyMap | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> Checkpoint:
    """Load a checkpoint into ``model``; the model is untouched unless every key and shape fits.

    Args:
        model: any module (a ``DEQ``, or a user's own module before adaptation).
        source: a safetensors or ``torch.save`` file, or a state dict (or container) in memory.
        key_map: prefix renames (a :class:`KeyMap` or ``["OLD=NEW", ...]``), applied first.
        filter_fn: ``(state_dict, model) -> state_dict``, applied after the key map.

    Returns:
        What was loaded and from where (:meth:`Checkpoint.describe` says it in one line).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an unreadable file (see :func:`read_checkpoint`), a key map rule that
            matches nothing; :class:`CheckpointMismatchError` when the result does not fit.
    """
    checkpoint = read_checkpoint(source)
    state, changes = checkpoint.state, list(checkpoint.changes)
    if key_map is not None:
        rules = key_map if isinstance(key_map, KeyMap) else KeyMap.parse(key_map)
        try:
            state, counts = rules.rename(state)
        except CheckpointError as error:
            raise CheckpointError(f"checkpoint {checkpoint.source}: {error}") from None
        changes.append(
            "key map " + ", ".join(f"{o}={n} ({c} keys)" for (o, n), c in zip(rules.rules, counts))
        )
    if filter_fn is not None:
        state = filter_fn(dict(state), model)
        changes.append(f"filter {getattr(filter_fn, '__name__', repr(filter_fn))}")
    check_fits(state, model, checkpoint.source)
    model.load_state_dict(state, strict=True)
    return replace(checkpoint, state=state, changes=tuple(changes))
