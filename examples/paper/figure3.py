"""Figure 3: the sweep of intermediate attacks on the unrolling-trained DEQ (development split):
(a) PGD-10 with the adjoint state u_n as the gradient, accuracy of the final and the early
state per n; (b), (c) PGD-10 through the unrolled intermediate z_n with k steps, lambda 0.5 and
1, accuracy of the early state. The data is the protocol's sweep (shared with Table 2).

    python -m examples.paper.figure3 --preset cpu
"""

from __future__ import annotations

import time
from typing import Any

from matplotlib.figure import Figure

from examples.paper import common

PAPER = [
    {"panel": "(a)", "finding": "unrolling-trained: u_4 gives the largest drop of the early "
     "state z_3; consecutive u_n attack the final state increasingly strongly; exact-trained "
     "(8/7): u_8 strongest for both"},
    {"panel": "(b)/(c)", "finding": "unrolling z_1 with k=1, lambda=1 gives the largest drop "
     "of z_3; few unrolling steps are better for early z_n"},
]  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    _, report = common.run_protocol(setup, "unrolling")
    n_star = report.early_exit
    adjoint = [{"n": e["params"]["n"], "beta": e["params"]["beta"],
                "final": common.pct(e["accuracy"]["final"]),
                "early": common.pct(e["accuracy"]["early"])}
               for e in report.sweep if e["family"] == "adjoint"]  # fmt: skip
    unrolled = [{"n": e["params"]["n"], "k": e["params"]["k"], "lam": e["params"]["lam"],
                 "final": common.pct(e["accuracy"]["final"]),
                 "early": common.pct(e["accuracy"]["early"])}
                for e in report.sweep if e["family"] == "unrolled"]  # fmt: skip
    figure = Figure(figsize=(14, 4))
    axes = figure.subplots(1, 3)
    for beta in sorted({r["beta"] for r in adjoint}):
        rows = [r for r in adjoint if r["beta"] == beta]
        for d in ("final", "early"):
            axes[0].plot([r["n"] for r in rows], [r[d] for r in rows], marker="o",
                         label=f"{d}, beta {beta}")  # fmt: skip
    axes[0].set(xlabel="adjoint state u_n", ylabel="accuracy (%)", title="(a) adjoint u_n")
    for ax, lam in zip(axes[1:], (0.5, 1.0), strict=True):
        for k in sorted({r["k"] for r in unrolled}):
            rows = [r for r in unrolled if r["k"] == k and r["lam"] == lam]
            ax.plot([r["n"] for r in rows], [r["early"] for r in rows], marker="o",
                    label=f"k={k}")  # fmt: skip
        ax.set(xlabel="unrolled state z_n", ylabel=f"early (z_{n_star}) accuracy (%)",
               title=f"unrolled z_n, lambda={lam}")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(setup.out_dir / "figure3.png", dpi=120)
    strongest: dict[str, Any] = {
        family: min(rows, key=lambda r: r["early"])
        for family, rows in (("adjoint", adjoint), ("unrolled", unrolled))
    }
    return common.write_results(
        setup, f"Figure 3: the sweep of intermediate attacks (early exit z_{n_star})",
        {"(a) adjoint u_n": adjoint, "(b)/(c) unrolled z_n": unrolled},
        {"figure 3 (read from the figure and Sec. 6.4)": PAPER}, started,
        notes=[f"development split; early = Early(z_{n_star}); strongest against the early "
               f"state: {strongest}", "figure3.png plots the three panels"],
        extra={"strongest": strongest},
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "figure3")

if __name__ == "__main__":
    raise SystemExit(main())
