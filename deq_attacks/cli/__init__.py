"""``deq-attacks``: the command line. Each subcommand lives in its own module, imported only
when it runs (``deq-attacks --help`` imports no torch).

- ``deq-attacks`` (no subcommand, or options only) or ``deq-attacks demo``: the main job on the
  embedded digits.
- ``deq-attacks evaluate``: the white-box evaluation protocol on a trained model.
- ``deq-attacks train``: adversarial training from a named preset.
- ``deq-attacks list``: the registered solvers, estimates, attacks, sweeps, models, presets.

Every subcommand runs with the working directory first on ``sys.path``, as under ``python -m``:
a ``--model.name module:function`` (``--train.model.name`` of the demo) is imported from there.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

#: subcommand -> (its module, whose main(argv) returns the exit code; one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "deq_attacks.cli.demo",
        "train a small DEQ on the embedded digits and evaluate it (default)",
    ),
    "evaluate": ("deq_attacks.cli.evaluate", "the whole white-box protocol on a trained DEQ"),
    "train": (
        "deq_attacks.cli.train",
        "adversarial training from a named preset (Table 7, CPU presets)",
    ),
    "list": (
        "deq_attacks.cli.listing",
        "the registered solvers, estimates, attacks, sweeps, models and presets",
    ),
}


def usage() -> str:
    lines = ["usage: deq-attacks [SUBCOMMAND] [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += [
        "",
        "deq-attacks SUBCOMMAND --help lists a subcommand's options; every subcommand takes",
        "--config FILE (YAML or JSON) and --print_config.",
    ]
    return "\n".join(lines)


def subcommand(name: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main`` of subcommand ``name`` (its module imported now)."""
    main: Callable[[Sequence[str] | None], int] = importlib.import_module(SUBCOMMANDS[name][0]).main
    return main


@contextmanager
def working_directory_on_path() -> Iterator[None]:
    """Put the working directory first on ``sys.path`` for the duration, as ``python -m``
    does (a console script such as ``deq-attacks`` has its own folder there instead)."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if cwd in sys.path:
            sys.path.remove(cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand (the working directory importable); without one (or with
    options only) run the demo."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        print(usage())
        return 0
    name, rest = ("demo", args) if not args or args[0].startswith("-") else (args[0], args[1:])
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    with working_directory_on_path():
        return subcommand(name)(rest)
