"""Plain-dataclass configuration: command-line options derived from the fields, not written twice.

A config is a frozen dataclass that validates itself in ``__post_init__``. Its fields of type
int, float, str, bool, Path, an Enum, or an optional of those become ``--field-name`` options;
the field's docstring-style help comes from ``field(metadata={"help": ...})``.

    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, TrainConfig)
    config = dataclass_from_options(TrainConfig, parser.parse_args(argv), base=preset)

``override(config, {"lr": "0.01"})`` applies ``key=value`` strings (from a file or a ``--set``
option) with the same parsing, and names an unknown key with the keys that exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

_SCALARS = (int, float, str, bool, Path)


def _field_type(cls: type, f: dataclasses.Field[Any]) -> tuple[type, bool]:
    """(scalar type, optional) of a dataclass field; raises for types with no option form."""
    hints = typing.get_type_hints(cls)
    hint = hints[f.name]
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"{cls.__name__}.{f.name}: no option form for {hint}")
        hint = args[0]
    if isinstance(hint, type) and (issubclass(hint, _SCALARS) or issubclass(hint, enum.Enum)):
        return hint, optional
    raise TypeError(f"{cls.__name__}.{f.name}: no option form for {hint}")


def option_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` that have a command-line form (others are skipped)."""
    fields = []
    for f in dataclasses.fields(cls):
        try:
            _field_type(cls, f)
        except TypeError:
            continue
        fields.append(f)
    return fields


def parse_value(cls: type, name: str, text: str) -> Any:
    """Parse ``text`` as the value of field ``name`` of ``cls`` (clear error if it cannot)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    if name not in known:
        raise ValueError(
            f"unknown setting {name!r} for {cls.__name__}; known: {', '.join(sorted(known))}"
        )
    kind, optional = _field_type(cls, known[name])
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        converter: Any = kind
        return converter(text)
    except ValueError:
        choices = ""
        if issubclass(kind, enum.Enum):
            choices = f" (choose one of {', '.join(str(m.value) for m in kind)})"
        raise ValueError(
            f"bad value {text!r} for {cls.__name__}.{name}: expected {kind.__name__}{choices}"
        ) from None


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--field-name`` for every option field of ``cls``; defaults stay unset (None), so
    only what the user typed overrides the preset or the dataclass default."""
    group = parser.add_argument_group(f"{cls.__name__} settings")
    for f in option_fields(cls):
        kind, _ = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default})"
        group.add_argument(
            flag,
            dest=f.name,
            default=None,
            metavar=kind.__name__.upper(),
            type=_OptionParser(cls, f.name),
            help=help_text,
        )


class _OptionParser:
    """argparse ``type=`` for one field: our message, not argparse's "invalid value"."""

    def __init__(self, cls: type, name: str) -> None:
        self.cls, self.name = cls, name

    def __call__(self, text: str) -> Any:
        try:
            return parse_value(self.cls, self.name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None


def dataclass_from_options(cls: type[C], namespace: argparse.Namespace, base: C | None = None) -> C:
    """``base`` (or ``cls()``) with every option the user set in ``namespace`` replaced; the
    dataclass validates the result."""
    values = {
        f.name: getattr(namespace, f.name)
        for f in option_fields(cls)
        if getattr(namespace, f.name, None) is not None
    }
    start = base if base is not None else cls()
    return dataclasses.replace(start, **values)  # type: ignore[type-var]


def parse_pairs(items: Iterable[str], option: str = "--set") -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict (dashes in keys read as underscores)."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        pairs[key.strip().replace("-", "_")] = value
    return pairs


def override(config: C, settings: Mapping[str, str]) -> C:
    """``config`` with ``key=value`` strings applied (unknown keys and bad values raise)."""
    cls = type(config)
    values = {key: parse_value(cls, key, text) for key, text in settings.items()}
    return dataclasses.replace(config, **values)  # type: ignore[type-var]


def to_jsonable(config: Any) -> dict[str, Any]:
    """A dataclass as plain JSON values (enums by value, paths as strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {k: convert(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in dataclasses.asdict(config).items()}
