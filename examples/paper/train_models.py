"""Train the models the paper scripts share into the cache (optional: each script trains what
it needs on first use), ``--jobs`` of them at a time in separate processes.

    python -m examples.paper.train_models --preset cpu   # every CPU model, 2 at a time
    python -m examples.paper.train_models --preset cpu --kinds exact,clean
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from examples.paper.common import Setup, in_processes, parse, parser, train_cached, train_config
from examples.paper.table11 import WEIGHTS

#: Every model kind a script asks for, per preset, the longest first.
KINDS = {
    "cpu": "exact_18_20,exact,unrolling,clean,baseline",
    "tiny": "exact,unrolling,clean",
    "paper": "exact_50_50,exact_30_30,exact_18_20,unrolling_xl,exact,unrolling,clean,baseline",
}


def train_one(setup: Setup, kind: str, changes: dict[str, Any]) -> str:
    """Train (or find) one model; a line with its wall time."""
    started = time.perf_counter()
    train_cached(setup, kind, **changes)
    named = f"{kind} {changes}" if changes else kind
    return f"{named}: {time.perf_counter() - started:.0f} s"


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--kinds", type=str | None, help="comma-separated model kinds")
    p.add_argument("--jac_weights", "--jac-weights", type=str | None,
                   help="exact models with these JR weights (null: Table 11's; '' none)")
    args = parse(p, argv)
    setup = Setup.from_args(args, "train_models")
    if args.jac_weights is None:
        weights = WEIGHTS[args.preset]
    else:
        weights = [float(w) for w in filter(None, args.jac_weights.split(","))]
    kinds = (args.kinds or KINDS[args.preset]).split(",")
    wanted: list[tuple[str, dict[str, Any]]] = [(kind, {}) for kind in kinds]
    wanted += [("exact", {"jac_weight": w}) for w in weights]
    # one task per distinct model (gamma 0.4 is the exact preset itself)
    tasks, seen = [], set()
    for kind, changes in wanted:
        key = train_config(setup, kind, **changes).fingerprint()
        if key not in seen:
            seen.add(key)
            tasks.append((kind, changes))
    for line in in_processes(setup.jobs, train_one, [(setup, k, c) for k, c in tasks]):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
