"""``deq-attacks``: the command line. Each subcommand lives in its own module.

- ``deq-attacks`` (no subcommand) or ``deq-attacks demo``: the main job on the embedded digits.
- ``deq-attacks evaluate``: the white-box evaluation protocol on a trained model.
- ``deq-attacks train``: adversarial training from a named preset.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from deq_attacks.cli import demo, evaluate, train

#: subcommand -> (its main(argv) -> exit code, one-line help)
SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str] | None], int], str]] = {
    "demo": (demo.main, "train a small DEQ on the embedded digits and evaluate it (default)"),
    "evaluate": (evaluate.main, "the whole white-box protocol on a trained DEQ"),
    "train": (train.main, "adversarial training from a named preset (Table 7, CPU presets)"),
}


def usage() -> str:
    lines = ["usage: deq-attacks [SUBCOMMAND] [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "deq-attacks SUBCOMMAND --help lists a subcommand's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; without one (or with options only) run the demo."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(usage())
        return 0
    if args and not args[0].startswith("-"):
        name = args[0]
        if name not in SUBCOMMANDS:
            print(f"unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
            return 2
        return SUBCOMMANDS[name][0](args[1:])
    return demo.main(args)
