"""Tables 5 and 6: a standard-trained (no adversarial training) DEQ: clean and ready-made
PGD-10 accuracy of every state z_n (Table 5), and the defense x attack matrix of the whole
protocol (Table 6).

    python -m examples.paper.table5_6 --preset cpu
"""

from __future__ import annotations

import time

from examples.paper import common

PAPER_T5 = [
    {"row": "clean", **{f"z_{n}": v for n, v in enumerate(
        [38.81, 82.62, 89.63, 91.77, 92.08, 92.29, 92.39, 92.53], 1)}},
    {"row": "PGD-10 (ready-made)", **{f"z_{n}": v for n, v in enumerate(
        [2.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00], 1)}},
]  # fmt: skip
PAPER_T6 = common.layout_rows([
    ["final", 92.53, 8.90, 11.45, 3.69, 0.00, 0.00, 0.00],
    ["early", 38.81, 6.08, 4.54, 3.42, 2.00, 2.94, 1.31],
    ["ensemble", 87.31, 9.12, 6.39, 3.48, 0.00, 0.00, 0.00],
])  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    _, report = common.run_protocol(setup, "clean")
    states = report.states
    table5 = [
        {"row": "clean", **{f"z_{n}": common.pct(v)
                            for n, v in enumerate(states["clean_accuracy"], 1)}},
        {"row": f"PGD-{common.eval_config(setup).steps} (ready-made)",
         **{f"z_{n}": common.pct(v) for n, v in enumerate(states["ready_made_accuracy"], 1)}},
    ]  # fmt: skip
    return common.write_results(
        setup, "Tables 5 and 6: a standard-trained DEQ",
        {"table 5": table5, "table 6": common.paper_layout(report, "PGD")},
        {"table 5": PAPER_T5, "table 6": PAPER_T6}, started,
        notes=[f"n* = {report.early_exit}, chosen {report.chosen}",
               f"white-box robustness {common.robustness(report)}",
               *common.diagnostic_notes("standard-trained", report)],
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "table5_6")

if __name__ == "__main__":
    raise SystemExit(main())
