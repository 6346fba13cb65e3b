"""One registry type for everything the package names (timm style): solvers, gradient
estimates, sweep families, attacks, models and presets.

One name rule everywhere: lower-case letters, digits and ``_``; a ``-`` is read as ``_``
(``apgd-ce`` and ``apgd_ce`` name the same attack), so the names users type keep working.
A lookup of an unknown name raises, listing the choices; ``scoped()`` undoes the
registrations made inside it (tests, experiments).

Registered dataclasses (solvers, estimates, attacks) are also built from spec text, the one
form of the command line::

    name                                      every setting at its default
    name:key=value,key=value                  e.g. "anderson:threshold=8,memory=5"
    name:key=(nested:key=value)               a setting that is itself registered
                                              (an estimate's solver, an ensemble's estimate)

read by ``parse_spec`` (split) and ``Registry.create`` (typed by the dataclass's field
types), printed by ``Registry.text``, and written as plain JSON by ``Registry.to_json``
(``{"solver": "anderson", "threshold": 8, ...}``), read back by ``Registry.from_json``. A list
of specs (``--attacks "pgd,autoattack:iterations=100,queries=50,square:queries=5000"``) is
split by ``split_specs``: an item ``key=value`` belongs to the spec before it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

__all__ = [
    "Registry",
    "canonical",
    "entry_point",
    "format_spec",
    "parse_spec",
    "split_specs",
    "split_top",
]

T = TypeVar("T")
C = TypeVar("C")

#: The canonical form of a name.
NAME = re.compile(r"[a-z0-9_]+")
#: An item of a spec list that is a setting of the spec before it (``key=...``).
SETTING = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_-]*\s*=")

_REGISTRIES: list[Registry[Any]] = []


def entry_point(text: str, role: str) -> Any:
    """The attribute that a user's ``"package.module:attribute"`` names, imported; ``role``
    (e.g. ``"model 'pkg.mod:build'"``) names it in the one-line errors: a malformed text, a
    module that does not import (any error while importing it, named), a missing attribute."""
    module_name, sep, attr = text.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{role}: expected 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail in any way while importing
        raise ValueError(
            f"cannot import {module_name!r} for {role} ({type(error).__name__}: {error}; "
            f"looked on sys.path, which starts with {sys.path[:2]})"
        ) from None
    if not hasattr(module, attr):
        raise ValueError(f"{module_name!r} has no attribute {attr!r} ({role})")
    return getattr(module, attr)


def canonical(name: str) -> str:
    """``name`` in the one spelling: stripped, ``-`` read as ``_``; anything but lower-case
    letters, digits and ``_`` raises naming the spelling to use."""
    if not isinstance(name, str):
        raise TypeError(f"a name is a text, got {name!r}")
    spelled = name.strip().replace("-", "_")
    if not NAME.fullmatch(spelled):
        hint = re.sub(r"[^a-z0-9_]", "_", spelled.lower())
        raise ValueError(
            f"a name is lower-case letters, digits and '_' ('-' reads as '_'), got {name!r}"
            + (f" (did you mean {hint!r}?)" if NAME.fullmatch(hint) else "")
        )
    return spelled


def split_top(text: str, separator: str = ",") -> list[str]:
    """``text`` split at ``separator`` outside parentheses, items stripped, empty ones left out."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in {text!r}")
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """(canonical name, key -> value text) of ``"name:key=value,key=(nested:k=v)"``; a value in
    parentheses loses them; keys follow the name rule; a key given twice raises."""
    if not isinstance(text, str):
        raise TypeError(f"a spec is a text such as 'name:key=value', got {text!r}")
    name, _, rest = text.strip().partition(":")
    settings: dict[str, str] = {}
    for item in split_top(rest):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"spec {text!r}: expected NAME:KEY=VALUE,..., got {item!r}")
        key = canonical(key)
        if key in settings:
            raise ValueError(f"spec {text!r}: {key} is given twice")
        value = value.strip()
        if value.startswith("(") and value.endswith(")"):
            value = value[1:-1].strip()
        settings[key] = value
    return canonical(name), settings


def split_specs(text: str) -> list[str]:
    """The specs of a comma-separated list: ``"pgd,autoattack:iterations=5,queries=50,square"``
    -> ``["pgd", "autoattack:iterations=5,queries=50", "square"]`` (an item ``key=value``
    belongs to the spec before it)."""
    if not isinstance(text, str):
        raise TypeError(f"a list of specs is a comma-separated text, got {text!r}")
    specs: list[str] = []
    for item in split_top(text):
        if SETTING.match(item):
            if not specs:
                raise ValueError(f"{text!r}: the setting {item!r} comes before any name")
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def format_spec(name: str, settings: Mapping[str, str]) -> str:
    """``"name:key=value,..."`` (``"name"`` without settings); a value holding ``,``, ``:``
    or ``=`` is written in parentheses."""
    items = [
        f"{key}=({value})" if any(c in value for c in ",:=") else f"{key}={value}"
        for key, value in settings.items()
    ]
    return f"{name}:{','.join(items)}" if items else name


def _optional(hint: Any) -> tuple[tuple[Any, ...], bool]:
    """(the types of ``hint`` with None removed, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        kept = tuple(a for a in args if a is not type(None))
        return kept, len(kept) < len(args)
    return (hint,), False


def _registry_for(kind: Any) -> Registry[Any] | None:
    """The registry whose entries are subclasses of the class ``kind``, if any."""
    if not isinstance(kind, type):
        return None
    for registry in reversed(_REGISTRIES):
        if registry.base is not None and issubclass(kind, registry.base):
            return registry
    return None


def default_parameters(cls: type) -> list[str]:
    """A dataclass's fields that take part in construction and equality (callbacks marked
    ``compare=False`` are not parameters), in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.compare]


def _defaults(cls: type) -> dict[str, Any]:
    """The default of each field of a dataclass that has one."""
    found = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return found


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind, under the one name rule; a read-only mapping name -> entry
    in registration order (``registry["apgd-ce"]`` normalises the name).

    Args:
        kind: what an entry is, for messages ("solver", "gradient estimate").
        base: the class every entry subclasses (then entries are classes, built from spec
            text), or None (entries are any objects: builders, families, presets).
        key: the name's key in a JSON spec (default: ``kind``).
        parameters: the settings of an entry class (default: ``default_parameters``).
    """

    def __init__(
        self,
        kind: str,
        base: type | None = None,
        *,
        key: str | None = None,
        parameters: Callable[[type], list[str]] = default_parameters,
    ) -> None:
        self.kind = kind
        self.base = base
        self.key = key or kind
        self.parameters = parameters
        self._entries: dict[str, T] = {}
        _REGISTRIES.append(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    # -- the mapping ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self.get_entry(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            return canonical(name) in self._entries
        except ValueError:
            return False

    # -- registration -----------------------------------------------------------------------
    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; another entry under that name raises."""
        self._check_spelling(name)
        if self.base is not None and not (isinstance(entry, type) and issubclass(entry, self.base)):
            raise TypeError(f"a {self.kind} is a {self.base.__name__} subclass, got {entry!r}")
        if self.base is not None and not dataclasses.is_dataclass(entry):
            raise TypeError(f"{entry!r} must be a dataclass: its fields make its spec")
        known = self._entries.get(name)
        if known is not None and known is not entry and known != entry:
            shown = getattr(known, "__name__", repr(known))
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({shown})")
        self._entries[name] = entry
        return entry

    def register(self, name: str | None = None) -> Callable[[C], C]:
        """Decorator: register the decorated class or function as ``name`` (default: its
        ``__name__``)."""
        if name is not None:
            self._check_spelling(name)

        def register(entry: C) -> C:
            self.add(name if name is not None else entry.__name__, entry)  # type: ignore[attr-defined, arg-type]
            return entry

        return register

    def _check_spelling(self, name: str) -> None:
        if canonical(name) != name:
            raise ValueError(
                f"a {self.kind} name is registered as {canonical(name)!r}, not {name!r}"
            )

    @contextmanager
    def scoped(self) -> Iterator[None]:
        """Entries registered inside are unregistered on exit (and replaced ones restored)."""
        saved = dict(self._entries)
        try:
            yield
        finally:
            self._entries.clear()
            self._entries.update(saved)

    # -- lookup -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def choices(self) -> str:
        """The names as a message lists them, sorted."""
        return ", ".join(sorted(self._entries)) or "(none)"

    def get_entry(self, name: str) -> T:
        """The entry ``name``; an unknown name raises listing the choices."""
        spelled = canonical(name)
        if spelled not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.choices()}")
        return self._entries[spelled]

    def name_of(self, entry: object) -> str:
        """The name of ``entry`` (or of an instance's class, for a registry of classes)."""
        for name, known in self._entries.items():
            if known is entry or (self.base is not None and type(entry) is known):
                return name
        shown = type(entry).__name__ if self.base is not None else repr(entry)
        raise ValueError(f"{shown} is not a registered {self.kind}")

    # -- instances of registered dataclasses ------------------------------------------------
    def settings_of(self, name: str) -> list[str]:
        """The settings of the entry class ``name``, in declaration order."""
        return self.parameters(self._entry_class(name))  # type: ignore[arg-type]

    def _entry_class(self, name: str) -> type:
        entry = self.get_entry(name)
        if self.base is None or not dataclasses.is_dataclass(entry):
            raise TypeError(f"a {self.kind} is not built from a spec")
        return entry  # type: ignore[return-value]

    def _check_keys(self, name: str, keys: list[str]) -> None:
        known = self.settings_of(name)
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} has no setting {', '.join(map(repr, unknown))}; its "
                f"settings: {', '.join(known) or '(none)'}"
            )

    def make(self, name: str, **settings: Any) -> Any:
        """The entry class ``name`` built with ``settings``; an unknown setting raises listing
        the known ones."""
        cls = self._entry_class(name)
        self._check_keys(name, list(settings))
        return cls(**settings)

    def create(self, text: str, **settings: Any) -> Any:
        """An instance from spec text (``"name:key=value,..."``), values typed by the fields;
        ``settings`` are further typed settings given apart (one the text gives too raises)."""
        name, given = parse_spec(text)
        cls = self._entry_class(name)
        self._check_keys(name, list(given))
        for key in given:
            if key in settings:
                raise ValueError(
                    f"the {key} is given twice (in {text!r} and as {key}={settings[key]!r}): "
                    "give it once"
                )
        typed = {key: self._from_text(cls, key, value) for key, value in given.items()}
        return self.make(name, **typed, **settings)

    def _hint(self, cls: type, key: str) -> Any:
        return typing.get_type_hints(cls)[key]

    def _from_text(self, cls: type, key: str, text: str) -> Any:
        kinds, optional = _optional(self._hint(cls, key))
        if optional and text.lower() in ("none", "null"):
            return None
        for kind in kinds:
            nested = _registry_for(kind)
            if nested is not None:
                return nested.create(text)
        kind = kinds[0] if len(kinds) == 1 else (str if str in kinds else kinds[0])
        try:
            if kind is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return lowered in ("true", "1", "yes")
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                return kind(text)
            if kind in (int, float, str):
                return kind(text)
        except ValueError:
            choices = ""
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                choices = f" (one of {', '.join(str(m.value) for m in kind)})"
            shown = getattr(kind, "__name__", str(kind))
            raise ValueError(
                f"{self.kind} setting {key}={text!r}: expected {shown}{choices}"
            ) from None
        raise TypeError(f"{self.kind} setting {key!r} of type {kind} has no text form")

    def text(self, instance: object) -> str:
        """The spec text of ``instance``: its name and every setting that differs from the
        default (``create`` of it builds an equal instance)."""
        name = self.name_of(instance)
        defaults = _defaults(self._entry_class(name))
        items = {}
        for key in self.settings_of(name):
            value = getattr(instance, key)
            if key not in defaults or value != defaults[key]:
                items[key] = self._to_text(value)
        return format_spec(name, items)

    def _to_text(self, value: Any) -> str:
        nested = _registry_for(type(value))
        if nested is not None:
            return nested.text(value)
        if isinstance(value, enum.Enum):
            return str(value.value)
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float, str)):
            return str(value)
        raise TypeError(f"no text form for the {self.kind} setting value {value!r}")

    def to_json(self, instance: object) -> dict[str, Any]:
        """``{key: name, setting: value, ...}`` in plain JSON values (enums by value, nested
        registered values as nested specs)."""
        name = self.name_of(instance)
        values = {k: self._value_json(getattr(instance, k)) for k in self.settings_of(name)}
        return {self.key: name, **values}

    def _value_json(self, value: Any) -> Any:
        nested = _registry_for(type(value))
        if nested is not None:
            return nested.to_json(value)
        if isinstance(value, enum.Enum):
            return value.value
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"no spec form for the value {value!r}")

    def from_json(self, spec: Mapping[str, Any]) -> Any:
        """The instance that ``to_json`` described."""
        if not isinstance(spec, Mapping) or self.key not in spec:
            raise ValueError(f"a {self.kind} spec needs its name under {self.key!r}, got {spec!r}")
        name = str(spec[self.key])
        cls = self._entry_class(name)
        settings = {k: v for k, v in spec.items() if k != self.key}
        self._check_keys(name, list(settings))
        return self.make(name, **{k: self._from_json(cls, k, v) for k, v in settings.items()})

    def _from_json(self, cls: type, key: str, value: Any) -> Any:
        kinds, optional = _optional(self._hint(cls, key))
        if value is None and optional:
            return None
        for kind in kinds:
            nested = _registry_for(kind)
            if nested is not None:
                if not isinstance(value, Mapping):
                    raise ValueError(
                        f"{self.kind} setting {key!r} takes a nested spec, got {value!r}"
                    )
                return nested.from_json(value)
        kind = kinds[0]
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            try:
                return kind(value)
            except ValueError:
                choices = ", ".join(str(m.value) for m in kind)
                raise ValueError(
                    f"{self.kind} setting {key}={value!r}: choose one of {choices}"
                ) from None
        return value
