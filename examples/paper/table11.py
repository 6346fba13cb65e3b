"""Table 11: exact-trained (8/7) DEQs with several Jacobian-regularisation weights gamma, beside
the (18/20) exact-trained and the unrolling-trained DEQ (gamma 0.4): clean, ready-made PGD-10
and Square accuracy of the final state. The CPU preset adds gamma 0 (no regularisation): does
the fixed point break without it?

    python -m examples.paper.table11 --preset cpu
"""

from __future__ import annotations

import time
from typing import Any

from deq_attacks.evaluation import column_scores, protocol_columns
from deq_attacks.gradients import ready_made
from examples.paper import common

PAPER = [
    {"row": "clean", "0.4": 78.24, "0.8": 82.27, "1.2": 80.64, "1.6": 78.82, "2.0": 67.34,
     "3.2": 66.70, "0.4 (18/20)": 73.16, "0.4 (unroll)": 78.03},
    {"row": "PGD (ready-made)", "0.4": 79.97, "0.8": 71.00, "1.2": 48.71, "1.6": 62.23,
     "2.0": 61.77, "3.2": 65.22, "0.4 (18/20)": 39.92, "0.4 (unroll)": 42.67},
    {"row": "SQUARE", "0.4": 5.95, "0.8": 10.00, "1.2": 32.54, "1.6": 23.85, "2.0": 4.21,
     "3.2": 2.72, "0.4 (18/20)": 47.20, "0.4 (unroll)": 45.34},
]  # fmt: skip
WEIGHTS = {"paper": [0.4, 0.8, 1.2, 1.6, 2.0, 3.2], "cpu": [0.0, 0.4, 1.2, 2.0],
           "tiny": [0.4, 1.2]}  # fmt: skip
OTHERS = {"paper": [("0.4 (18/20)", "exact_18_20"), ("0.4 (unroll)", "unrolling")],
          "cpu": [("0.4 (18/20)", "exact_18_20"), ("0.4 (unroll)", "unrolling")],
          "tiny": [("0.4 (unroll)", "unrolling")]}  # fmt: skip


def measure(setup: common.Setup, kind: str, **changes: Any) -> dict[str, float]:
    """Clean, ready-made PGD and Square accuracy of the final state, and the mean residual of
    the last iterate (clean test images)."""
    result = common.train_cached(setup, kind, **changes)
    _, test = common.split(setup)
    est = common.estimator(result, setup)
    config = common.eval_config(setup, autoattack=False)
    columns = {c.label: c for c in protocol_columns(
        {"ready-made": ready_made(est.deq.training_gradient)}, config)}  # fmt: skip
    clean = column_scores(est, test.x, test.y, config)
    pgd = column_scores(est, test.x, test.y, config, columns["ready-made PGD"])
    square = column_scores(est, test.x, test.y, config, columns["square"])
    return {"clean": common.pct(clean.accuracy("final")),
            "PGD (ready-made)": common.pct(pgd.accuracy("final")),
            "SQUARE": common.pct((square.correct["final"] & clean.correct["final"]).mean()),
            "residual z_N": round(float(clean.residuals[:, -1].mean()), 4)}  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    columns = {f"{w}": measure(setup, "exact", jac_weight=w) for w in WEIGHTS[setup.preset]}
    columns.update({name: measure(setup, kind) for name, kind in OTHERS[setup.preset]})
    rows = [{"row": r, **{c: v[r] for c, v in columns.items()}}
            for r in ("clean", "PGD (ready-made)", "SQUARE", "residual z_N")]  # fmt: skip
    config = common.eval_config(setup)
    return common.write_results(
        setup, "Table 11: Jacobian-regularisation weights of the exact-trained (8/7) DEQ",
        {"table 11": rows}, {"table 11": PAPER}, started,
        notes=[f"final state, eps {config.eps}, Square {common.square_queries(config)} queries; "
               "columns: gamma (8/7 exact-trained unless named)",
               "residual z_N: mean relative residual of the last iterate, clean test images"],
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "table11")

if __name__ == "__main__":
    raise SystemExit(main())
