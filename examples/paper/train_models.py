"""Train the models the paper scripts share into the cache (optional: each script trains what
it needs on first use).

    python -m examples.paper.train_models --preset cpu --kinds exact,clean
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from examples.paper.common import Setup, parser, train_cached

#: Every model kind a script asks for, per preset.
KINDS = {
    "cpu": "exact,unrolling,clean,exact_18_20,baseline",
    "tiny": "exact,unrolling,clean",
    "paper": "exact,unrolling,clean,exact_18_20,exact_30_30,exact_50_50,unrolling_xl,baseline",
}


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--kinds", default=None, help="comma-separated model kinds")
    p.add_argument("--jac-weights", default="", help="extra exact models with these JR weights")
    args = p.parse_args(argv)
    setup = Setup.from_args(args, "train_models")
    for kind in (args.kinds or KINDS[args.preset]).split(","):
        started = time.perf_counter()
        train_cached(setup, kind)
        print(f"{kind}: {time.perf_counter() - started:.0f} s")
    for weight in filter(None, args.jac_weights.split(",")):
        train_cached(setup, "exact", jac_weight=float(weight))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
