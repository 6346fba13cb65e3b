"""Figure 2: (a) robustness accumulation: under the ready-made PGD-10 the most robust
intermediate state z_n against the final one, for DEQs trained with different solver
iterations and gradients; (b) the mean relative residual ||f(z_n) - z_n|| / ||f(z_n)|| of
every state (a broken fixed point stays high).

    python -m examples.paper.figure2 --preset cpu
"""

from __future__ import annotations

import time

from matplotlib.figure import Figure

from examples.paper import common
from examples.paper.table10 import KINDS, state_profile

PAPER = [
    {"model": "exact (8/7)", "final PGD-10": 79.97, "best intermediate PGD-10": 63.95,
     "note": "Table 10 'PGD, Exact' (early row is z_n*, not the max); z_8 residual > 0.75"},
    {"model": "exact (18/20)", "final PGD-10": 39.92, "best intermediate PGD-10": 51.44,
     "note": "residuals fall below 0.05"},
    {"model": "exact (50/50)", "final PGD-10": 37.29, "best intermediate PGD-10": 74.04,
     "note": ""},
    {"model": "unrolling (8/7)", "final PGD-10": 42.67, "best intermediate PGD-10": 51.90,
     "note": "residual 0.04 at the final state"},
]  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    profiles = [state_profile(setup, kind) for kind in KINDS[setup.preset]]
    rows = []
    for p in profiles:
        states = p["ready_made_states"]
        best = max(range(len(states)), key=lambda i: states[i])
        rows.append({"model": p["label"], "final state z_N, ready-made PGD": states[-1],
                     "best intermediate": f"z_{best + 1}", "its ready-made PGD": states[best],
                     "accumulation (points)": round(states[best] - states[-1], 2),
                     "residual z_N": p["residual_states"][-1]})  # fmt: skip
    residuals = [{"model": p["label"], **{f"z_{n}": r for n, r in
                                          enumerate(p["residual_states"], 1)}}
                 for p in profiles]  # fmt: skip
    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    for p in profiles:
        n = range(1, len(p["ready_made_states"]) + 1)
        left.plot(n, p["ready_made_states"], marker="o", label=p["label"])
        right.plot(n, p["residual_states"], marker="o", label=p["label"])
    left.set(xlabel="state z_n", ylabel="accuracy under ready-made PGD (%)",
             title="(a) robustness of every state")  # fmt: skip
    right.set(xlabel="state z_n", ylabel="relative residual", yscale="log",
              title="(b) fixed-point residual")  # fmt: skip
    right.axhline(0.05, color="grey", linestyle=":")
    left.legend()
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(setup.out_dir / "figure2.png", dpi=120)
    return common.write_results(
        setup, "Figure 2: robustness accumulation and relative residuals",
        {"(a) final vs best intermediate state": rows, "(b) relative residual per state":
         residuals}, {"(a), from Table 10 / Sec. 6.1": PAPER}, started,
        notes=["per-state accuracy on the test split under PGD with the training gradient; "
               "figure2.png plots both panels"],
        extra={"profiles": profiles},
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "figure2")

if __name__ == "__main__":
    raise SystemExit(main())
