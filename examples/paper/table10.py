"""Table 10: exact-trained DEQs with more forward/backward solver iterations, beside the
unrolling-trained one: clean and PGD-10 (exact gradient, unrolling gradient) accuracy of the
final state and of the early-exit state, and the adversarial-training speed.

    python -m examples.paper.table10 --preset cpu
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from deq_attacks import Early, Exact, Final, Phantom, ready_made
from deq_attacks.evaluation import choose_early_exit, column_scores, protocol_columns
from deq_attacks.training import RunResult
from examples.paper import common

PAPER = [
    {"training": "exact (8/7)", "defense": "final", "clean": 78.24, "PGD exact": 79.97,
     "PGD unroll": 37.07, "samples/s": 28.3},
    {"training": "exact (8/7)", "defense": "early", "clean": 73.12, "PGD exact": 63.95,
     "PGD unroll": 53.09, "samples/s": 28.3},
    {"training": "exact (18/20)", "defense": "final", "clean": 73.16, "PGD exact": 39.92,
     "PGD unroll": 40.00, "samples/s": 22.3},
    {"training": "exact (18/20)", "defense": "early", "clean": 72.02, "PGD exact": 51.44,
     "PGD unroll": 51.07, "samples/s": 22.3},
    {"training": "exact (30/30)", "defense": "final", "clean": 81.17, "PGD exact": 41.51,
     "PGD unroll": 37.12, "samples/s": 7.6},
    {"training": "exact (30/30)", "defense": "early", "clean": 87.72, "PGD exact": 65.22,
     "PGD unroll": 62.74, "samples/s": 7.6},
    {"training": "exact (50/50)", "defense": "final", "clean": 73.51, "PGD exact": 37.29,
     "PGD unroll": 36.70, "samples/s": 5.3},
    {"training": "exact (50/50)", "defense": "early", "clean": 86.98, "PGD exact": 74.04,
     "PGD unroll": 73.93, "samples/s": 5.3},
    {"training": "unrolling (8/7)", "defense": "final", "clean": 78.03, "PGD exact": 48.03,
     "PGD unroll": 42.67, "samples/s": 35.4},
    {"training": "unrolling (8/7)", "defense": "early", "clean": 79.57, "PGD exact": 54.01,
     "PGD unroll": 51.90, "samples/s": 35.4},
]  # fmt: skip
KINDS = {
    "paper": ["exact", "exact_18_20", "exact_30_30", "exact_50_50", "unrolling"],
    "cpu": ["exact", "exact_18_20", "unrolling"],
    "tiny": ["exact", "unrolling"],
}


def label(setup: common.Setup, kind: str) -> str:
    c = common.train_config(setup, kind).model
    gradient = getattr(c.training_gradient, "value", None)
    if gradient == "phantom":
        return f"unrolling ({c.forward_threshold}/-)"
    return f"{gradient} ({c.forward_threshold}/{c.backward_threshold})"


def training_speed(result: RunResult) -> float | None:
    """Mean training samples per second over the adversarial-training epochs (None if none)."""
    values = [r["samples_per_s"] for r in result.state.history if "pgd-at" in r["phase"]]
    return round(float(np.mean(values)), 1) if values else None


def state_profile(setup: common.Setup, kind: str) -> dict[str, Any]:
    """For model ``kind`` on the test split: n* (by the ready-made PGD on the development
    split), per-state clean / ready-made PGD accuracy and residuals, and the final and early
    defenses under PGD with the exact and the unrolling gradient; the training speed."""
    result = common.train_cached(setup, kind)
    dev, test = common.split(setup)
    est = common.estimator(result, setup)
    config = dataclasses.replace(common.eval_config(setup), attacks="pgd")
    ready = ready_made(est.deq.training_gradient)
    gradients = {"ready-made": ready, "exact": Exact(), "unroll": Phantom(5, 0.5)}
    columns = {c.label: c for c in protocol_columns(gradients, config)}
    on_dev = column_scores(est, dev.x, dev.y, config, columns["ready-made PGD"])
    n_star = choose_early_exit(on_dev.states)
    defenses = {"final": Final(), "early": Early(n_star)}
    clean = column_scores(est, test.x, test.y, config, defenses=defenses)
    attacked = {name: column_scores(est, test.x, test.y, config, columns[f"{name} PGD"],
                                    defenses) for name in ("exact", "unroll")}  # fmt: skip
    ready_name = "unroll" if ready == Phantom(5, 0.5) else "exact"
    return {
        "kind": kind, "label": label(setup, kind), "early_exit": n_star,
        "speed": training_speed(result),
        "clean_states": [common.pct(v) for v in clean.per_state()],
        "ready_made_states": [common.pct(v) for v in attacked[ready_name].per_state()],
        "residual_states": [round(float(v), 4) for v in clean.residuals.mean(0)],
        "defense": {d: {"clean": common.pct(clean.accuracy(d)),
                        **{f"PGD {a}": common.pct(s.accuracy(d))
                           for a, s in attacked.items()}} for d in defenses},
    }  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    profiles = [state_profile(setup, kind) for kind in KINDS[setup.preset]]
    rows = [{"training": p["label"], "defense": f"{d} (z_{p['early_exit']})" if d == "early"
             else d, **cells, "samples/s": p["speed"]}
            for p in profiles for d, cells in p["defense"].items()]  # fmt: skip
    return common.write_results(
        setup, "Table 10: solver thresholds of exact-trained DEQs, with training speed",
        {"table 10": rows}, {"table 10": PAPER}, started,
        notes=["early = Early(n*), n* chosen on the development split by the ready-made PGD; "
               "final = the Final() readout",
               "samples/s: mean over the PGD-AT epochs of training (metrics.jsonl), on this "
               "machine, which may have run other jobs at the same time: compare with care"],
        extra={"profiles": profiles},
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "table10")

if __name__ == "__main__":
    raise SystemExit(main())
