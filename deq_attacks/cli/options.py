"""Command-line options from the config dataclasses, through jsonargparse.

Every parser (``new_parser``) takes ``--config FILE`` (YAML or JSON; applied where it stands on
the command line, so later options override it) and ``--print_config`` (the subcommand prints
the resolved, validated settings as a config file and exits). ``add_settings`` adds one option
per field of a config dataclass (its help: the docstring under the field), at the top level
(``--eps``) or under a nested key (``--eval.eps``); a field that is itself a dataclass (a
section of ``TrainConfig``, a ``ModelSpec``) gives its fields under its name
(``--optimiser.epochs``, ``--train.model.name``). Enums are shown by name and read by name or
value, in any case (``--model.training_gradient PHANTOM`` or ``phantom``), so a run's
``config.json``, which records values, reads back.

A preset sets defaults, not values: a subcommand parses once to learn the preset's name,
applies its settings with ``set_settings_defaults`` and parses again, so that dataclass
defaults < preset < ``--config`` files < options on the command line. Every problem (an
unknown option, a value of the wrong type, a dataclass's validation) is a ``CommandError``;
``fail`` prints it as one line ``deq-attacks <command>: <message>`` on stderr (exit code 2).

Option names are the fields' names (``--long_steps``), each also spelled with dashes
(``--long-steps``); the hand-written multi-word options of the subcommands take both
spellings too (``--out-dir``). This module imports no torch, nor
does building a parser from the config dataclasses: ``--help`` stays fast. The names in
``__all__`` are public: a script of one's own takes a config dataclass's settings as options the
same way (``examples/paper/common.py``: ``--train.FIELD`` and ``--eval.FIELD``).
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import typing
from argparse import ArgumentError, RawDescriptionHelpFormatter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
    set_parsing_settings,
)
from jsonargparse.typing import register_type

__all__ = [
    "CommandError",
    "add_settings",
    "fail",
    "given_settings",
    "new_parser",
    "parse",
    "print_settings",
    "refuse_renamed",
    "register_enum",
    "set_settings_defaults",
    "settings",
]

set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")
E = TypeVar("E", bound=enum.Enum)

#: Keys of a parsed namespace that are not settings (never printed, never passed on).
PARSER_KEYS = ("config", "print_config")


class CommandError(ValueError):
    """A problem with the options or settings, found before any work (one line of text)."""


class HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types and defaults of every option) with the description and
    epilog kept as written (their command examples)."""


def new_parser(
    prog: str | None, description: str | None, epilog: str | None = None
) -> ArgumentParser:
    """A parser with ``--config FILE`` and ``--print_config``; errors raise ``CommandError``
    (through ``parse``) instead of exiting. ``prog`` None: the script's name. An epilog (a
    module docstring) that starts with ``description`` is shown without that first paragraph."""
    if epilog and description and epilog.startswith(description) and "\n\n" in epilog:
        epilog = epilog.split("\n\n", 1)[1]
    parser = ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=HelpFormatter,
        print_config=None,
        exit_on_error=False,
        allow_abbrev=False,  # --train.epoch is not --train.epochs
        env_prefix=False,
        default_env=False,
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="a YAML or JSON file of settings (keys as the options' names, e.g. the output "
        "of --print_config); options after it override it",
    )
    parser.add_argument(
        "--print_config",
        "--print-config",
        action="store_true",
        help="print the resolved settings (a config file for --config) and exit",
    )
    return parser


def _enum_parser(cls: type[E]) -> Callable[[Any], E]:
    def parse(value: Any) -> E:
        if isinstance(value, cls):
            return value
        text = str(value).lower()
        for member in cls:
            if text in (member.name.lower(), str(member.value).lower()):
                return member
        names = ", ".join(member.name for member in cls)
        raise ValueError(f"expected one of {names} (or their values), got {value!r}")

    return parse


_REGISTERED: set[type] = set()


def register_enum(cls: type[enum.Enum]) -> None:
    """Make jsonargparse print ``cls`` by member name and read a name or a value."""
    if cls not in _REGISTERED:
        register_type(cls, serializer=lambda member: member.name, deserializer=_enum_parser(cls))
        _REGISTERED.add(cls)


def _enums_of(cls: type) -> Iterable[type[enum.Enum]]:
    """The enums among the field types of ``cls`` and of its sections (dataclass fields)."""
    for hint in typing.get_type_hints(cls).values():
        for part in (hint, *typing.get_args(hint)):
            if isinstance(part, type) and issubclass(part, enum.Enum):
                yield part
            elif isinstance(part, type) and dataclasses.is_dataclass(part):
                yield from _enums_of(part)


def add_settings(
    parser: ArgumentParser,
    cls: type,
    nested_key: str | None = None,
    skip: Iterable[str] = (),
    title: str | None = None,
) -> None:
    """One option per field of the dataclass ``cls`` (but ``skip``): ``--field`` at the top
    level, or ``--<nested_key>.field``; the help of each is the docstring under its field.
    The options form a group in the help, titled by ``title`` (a nested group) or else by the
    first line of the class's docstring."""
    for member in _enums_of(cls):
        register_enum(member)
    before = set(map(id, parser._actions))
    parser.add_class_arguments(cls, nested_key, as_group=True, skip=set(skip))
    if title is not None and nested_key is not None:
        parser.groups[nested_key].title = title  # type: ignore[index]
    add_dashed_aliases(parser, [a for a in parser._actions if id(a) not in before])


def add_dashed_aliases(parser: ArgumentParser, actions: Iterable[Any]) -> None:
    """Give each option of ``actions`` spelled with underscores its dashed spelling too
    (``--long_steps`` and ``--long-steps``; ``--train.dev_size``, ``--train.dev-size``)."""
    for action in actions:
        for name in list(action.option_strings):
            alias = "--" + name[2:].replace("_", "-")
            if name.startswith("--") and alias != name and alias not in action.option_strings:
                if alias in parser._option_string_actions:
                    raise ValueError(f"option {alias} (for {name}) is taken")
                parser._option_string_actions[alias] = action
                action.option_strings.append(alias)


def set_settings_defaults(
    parser: ArgumentParser, config: Any, nested_key: str | None = None, skip: Iterable[str] = ()
) -> None:
    """Make the fields of the dataclass instance ``config`` the defaults of its options."""
    prefix = f"{nested_key}." if nested_key else ""
    skipped = set(skip)
    parser.set_defaults(
        {
            prefix + key: value
            for f in dataclasses.fields(config)
            if f.name not in skipped
            for key, value in _leaves(f.name, getattr(config, f.name))
        }
    )


def _leaves(key: str, value: Any) -> Iterable[tuple[str, Any]]:
    """``(key, value)``, or a section's (a dataclass's) fields as ``(key.field, value)``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _leaves(f"{key}.{f.name}", getattr(value, f.name))
    else:
        yield key, value


def parse(parser: ArgumentParser, argv: list[str], *, defaults: bool = True) -> Namespace:
    """``parser.parse_args(argv)``; a jsonargparse error becomes a one-line ``CommandError``.
    With ``defaults=False`` the namespace holds only what the command line and the config
    files gave."""
    try:
        return parser.parse_args(argv, defaults=defaults)
    except ArgumentError as error:
        raise CommandError(" ".join(line.strip() for line in str(error).splitlines())) from None


def refuse_renamed(argv: Sequence[str], renamed: Mapping[str, str]) -> None:
    """Raise a one-line ``CommandError`` naming the new spelling of the first option of
    ``argv`` that ``renamed`` lists (old name, underscores or dashes -> new name)."""
    for token in argv:
        name = token.split("=", 1)[0]
        new = renamed.get(name) or renamed.get(name.replace("-", "_").replace("__", "--", 1))
        if new is not None:
            raise CommandError(f"{name} is now {new}")


def settings(cls: type[C], values: Namespace | Mapping[str, Any], **fixed: Any) -> C:
    """``cls`` built (and so validated) from ``fixed`` and the other fields of ``cls`` in
    ``values``; a ValueError or TypeError of its validation becomes a ``CommandError``."""
    given = values.as_dict() if isinstance(values, Namespace) else dict(values)
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)  # type: ignore[arg-type]
    kwargs = {k: v for k, v in given.items() if k in names}
    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in kwargs.items():  # sections (nested dataclasses): each validates itself
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            try:
                kwargs[key] = settings(hints[key], value)
            except CommandError as error:
                problems.append(str(error))
    if problems:
        raise CommandError("; ".join(problems))
    try:
        return cls(**kwargs, **fixed)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None


def given_settings(
    parser: ArgumentParser, argv: list[str], cls: type, nested_key: str
) -> dict[str, Any]:
    """The fields of ``cls`` under ``nested_key`` that the command line or a config file set
    (typed by jsonargparse), by their own names: a section's fields (a field that is a
    dataclass, as ``TrainConfig.optimiser``) come out of it. Each is checked by validating
    ``cls()`` with it (``cls().updated(**values)`` where the class has sections)."""
    given = parse(parser, argv, defaults=False).get(nested_key)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in (given.as_dict() if isinstance(given, Namespace) else {}).items():
        section = dataclasses.is_dataclass(hints.get(key)) and isinstance(value, Mapping)
        values.update(value if section else {key: value})
    try:
        base = cls()
        base.updated(**values) if hasattr(base, "updated") else dataclasses.replace(base, **values)
    except (ValueError, TypeError) as error:
        raise CommandError(f"--{nested_key}.*: {error}") from None
    return values


def print_settings(parser: ArgumentParser, args: Namespace) -> None:
    """Print ``args`` (the resolved settings) as a config file for ``--config``."""
    shown = args.clone()
    for key in PARSER_KEYS:
        if key in shown:
            del shown[key]
    sys.stdout.write(parser.dump(shown, skip_unset=False, skip_validation=True))


def fail(command: str, error: object) -> int:
    """Print ``deq-attacks <command>: <error>`` on stderr; the exit code 2."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"deq-attacks {command}: {message}", file=sys.stderr)
    return 2
