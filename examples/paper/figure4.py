"""Figure 4: alignment of the simultaneous adjoint with the forward pass in the unrolling-
trained DEQ: accuracy of every state z_m under PGD-10 with each adjoint state u_n as the
gradient (the protocol's sweep), whether u_{m+1} is the strongest attack on z_m, and the cosine
between the input gradients of Adjoint(n+1) and Unrolled(n, k=1, lambda=1).

    python -m examples.paper.figure4 --preset cpu
"""

from __future__ import annotations

import time

import numpy as np
from matplotlib.figure import Figure

from deq_attacks import Adjoint, Unrolled
from deq_attacks.evaluation import gradient_alignment
from examples.paper import common

PAPER = [{"finding": "for every z_n, u_{n+1} gives the largest robustness drop of z_n "
          "(DEQ-Large, unrolling-trained)"}]  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    result, report = common.run_protocol(setup, "unrolling")
    beta = float(report.chosen["adjoint"].split("beta=")[1].split(",")[0])
    entries = sorted((e for e in report.sweep
                      if e["family"] == "adjoint" and e["params"]["beta"] == beta),
                     key=lambda e: e["params"]["n"])  # fmt: skip
    matrix = np.array([[common.pct(a) for a in e["state_accuracy"]] for e in entries])
    steps = [e["params"]["n"] for e in entries]
    rows = [{"attack": f"u_{n}", **{f"z_{m}": float(v) for m, v in enumerate(row, 1)}}
            for n, row in zip(steps, matrix, strict=True)]  # fmt: skip
    best = [steps[int(np.argmin(matrix[:, m]))] for m in range(matrix.shape[1])]
    strongest = [{"state": f"z_{m}", "strongest u_n": f"u_{n}", "is u_(m+1)": n == m + 1}
                 for m, n in enumerate(best, 1)]  # fmt: skip
    _, test = common.split(setup)
    est = common.estimator(result, setup)
    count = min(32, len(test))
    cosines = []
    for n in range(1, est.deq.solver.threshold):
        alignment = gradient_alignment(est, {"adjoint": Adjoint(n + 1, beta)},
                                       test.x[:count], test.y[:count],
                                       reference=Unrolled(n, 1, 1.0))  # fmt: skip
        summary = alignment.estimates["adjoint"]
        defined = [c for c in summary.cosines if c is not None]
        cosines.append({"pair": f"u_{n + 1} vs unrolled z_{n}",
                        "mean": round(float(np.mean(defined)), 3) if defined else None,
                        "median": summary.median, "worst": summary.worst,
                        "undefined": summary.undefined})  # fmt: skip
    figure = Figure(figsize=(6, 5))
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set(xticks=range(matrix.shape[1]), xticklabels=[f"z_{m}" for m in
                                                       range(1, matrix.shape[1] + 1)],
           yticks=range(len(steps)), yticklabels=[f"u_{n}" for n in steps],
           title=f"accuracy (%) of z_m under PGD with u_n (beta {beta})")  # fmt: skip
    figure.colorbar(image)
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(setup.out_dir / "figure4.png", dpi=120)
    hits = sum(s["is u_(m+1)"] for s in strongest[:-1])
    return common.write_results(
        setup, "Figure 4: alignment of u_(n+1) with z_n",
        {"accuracy of z_m under PGD with u_n": rows, "strongest adjoint state per z_m":
         strongest, "cosine(Adjoint(n+1), Unrolled(n, 1, 1))": cosines},
        {"figure 4": PAPER}, started,
        notes=[f"development split; u_(m+1) is the strongest on z_m for {hits} of "
               f"{len(strongest) - 1} states z_1..z_(N-1)", "figure4.png: the matrix"],
        extra={"hits": hits},
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "figure4")

if __name__ == "__main__":
    raise SystemExit(main())
