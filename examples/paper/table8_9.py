"""Tables 8 and 9: the simultaneous adjoint against the adjoint-Broyden baseline (SHINE) and the
unrolled intermediates, each as the final, intermediate and ensemble attack (PGD-10), on the
unrolling-trained DEQ with the final, early and ensemble defenses.

The simultaneous adjoint's and the unrolled intermediates' columns, n* and the chosen steps come
from the protocol (shared with Table 2); the adjoint-Broyden columns are fixed-step PGD runs
with ``AdjointBroyden`` at the final state, at the chosen adjoint's step, and as a gradient
ensemble.

    python -m examples.paper.table8_9 --preset cpu
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from deq_attacks import AdjointBroyden, Early, Ensemble, Final, GradientEnsemble
from deq_attacks.evaluation import column_scores, protocol_columns
from examples.paper import common

_ATTACKS = ("final", "intermediate", "ensemble")


def _paper(values: list[list[Any]]) -> list[dict[str, Any]]:
    return [{"defense": v[0], "clean": v[1],
             **{a: "/".join(f"{x:.2f}" for x in cell) for a, cell in zip(_ATTACKS, v[2:])}}
            for v in values]  # fmt: skip


PAPER = {
    "DEQ-Large: adjoint / adjoint Broyden / unrolled": _paper([
        ["final", 78.03, (49.81, 52.34, 42.67), (59.49, 58.22, 62.24), (54.91, 58.06, 51.52)],
        ["early", 79.57, (54.90, 45.29, 51.90), (39.19, 43.48, 29.38), (42.76, 45.47, 34.20)],
        ["ensemble", 79.67, (51.52, 49.24, 49.02), (52.43, 49.24, 55.10),
         (49.47, 53.04, 47.12)]]),
    "DEQ-XL: adjoint / adjoint Broyden / unrolled": _paper([
        ["final", 82.92, (55.80, 65.00, 48.58), (55.80, 65.00, 65.94), (67.30, 71.20, 58.23)],
        ["early", 80.12, (51.40, 59.26, 52.08), (51.40, 59.26, 55.70), (60.78, 65.67, 48.88)],
        ["ensemble", 81.17, (52.87, 60.22, 51.70), (52.87, 60.22, 59.71),
         (61.40, 66.69, 56.45)]]),
}  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    result, report = common.run_protocol(setup, "unrolling")
    layout = {r["defense"]: r for r in common.paper_layout(report, "PGD")}
    adjoint_n = int(report.chosen["adjoint"].split("n=")[1].split(",")[0])
    _, test = common.split(setup)
    est = common.estimator(result, setup)
    config = dataclasses.replace(common.eval_config(setup), attacks="pgd")
    defenses = {"final": Final(), "early": Early(report.early_exit), "ensemble": Ensemble()}
    broyden = {"final": AdjointBroyden(), "intermediate": AdjointBroyden(n=adjoint_n),
               "ensemble": GradientEnsemble(AdjointBroyden())}  # fmt: skip
    columns = protocol_columns({f"adjoint Broyden {a}": e for a, e in broyden.items()}, config)
    scores = {a: column_scores(est, test.x, test.y, config, column, defenses)
              for a, column in zip(broyden, columns, strict=True)}  # fmt: skip
    rows = []
    for d in defenses:
        row: dict[str, Any] = {"defense": d, "clean": layout[d]["clean"]}
        for a in _ATTACKS:
            ours = (layout[d][f"adjoint {a}"], common.pct(scores[a].accuracy(d)),
                    layout[d][f"unrolled {a}"])  # fmt: skip
            row[a] = "/".join(f"{x:.2f}" for x in ours)
        rows.append(row)
    numbers = {d: {a: [float(x) for x in r[a].split("/")] for a in _ATTACKS}
               for d, r in zip(defenses, rows)}  # fmt: skip
    return common.write_results(
        setup, "Tables 8 and 9: simultaneous adjoint / adjoint Broyden / unrolled (PGD)",
        {"unrolling-trained: adjoint / adjoint Broyden / unrolled": rows},
        PAPER, started,
        notes=[f"n* = {report.early_exit}; intermediate = step {adjoint_n} (the protocol's "
               f"chosen adjoint {report.chosen['adjoint']}) for both adjoint methods; unrolled "
               f"intermediate = {report.chosen['unrolled']}",
               "adjoint final = exact gradient (u*), adjoint-Broyden final = -B_N^T dL/dz*"],
        extra={"numbers": numbers},
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "table8_9")

if __name__ == "__main__":
    raise SystemExit(main())
