"""Verdict mode and the racing sweep against the table and the grid (issue 23), counted in f
evaluations (``deq_attacks.evaluation.cost.counting_f``: hardware independent) with the CPU
time beside them.

Rows:

- ``verdict_vs_table``: the column step of verdict mode (at its defaults: its cover, the kept
  columns, the audit and any escalation) over table mode's, on the 400 held-out test digits
  after the demo's 100 development digits, the demo's model and settings; the notes say
  whether the per-sample verdicts agree and list each disagreeing (defense, sample) pair
  with the table's columns that broke it.
- ``verdict_vs_strongest``: the same verdict column step over the strongest column
  (backprop-through-solver AutoAttack) run alone on the same images against every defense.
- ``racing_vs_grid_demo``, ``racing_vs_grid_mnist``: the sweep (racing over grid) on the
  demo's development digits, and on an MNIST DEQ (the demo preset trained briefly on
  ``mnist_t10k.npz``, the ``mnist`` evaluation preset, 200 development images); skipped where
  the file is absent.
- ``verdict_vs_table_paper``: the cost model at the paper's scale (``benchmarks.paper_cost``).

The protocol runs once per mode (a run is minutes on a CPU): ``--repeats`` does not apply.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cases.cascade import _QUICK_EVAL, _is_quick, demo_model
from benchmarks.cases.common import Bounds, Context, Result, Row
from benchmarks.paper_cost import paper_scale
from deq_attacks import DEQ, BackpropThroughSolver, DEQEstimator, Early, Ensemble, Final
from deq_attacks.cli.demo import evaluation_defaults
from deq_attacks.evaluation import (
    EvaluationConfig,
    EvaluationReport,
    Mode,
    SweepMode,
    column_scores,
    evaluate_model,
    protocol_columns,
    run_sweep,
)
from deq_attacks.evaluation.aggregate import choose_early_exit
from deq_attacks.evaluation.attacks import attack_text
from deq_attacks.evaluation.cost import counting_f
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.presets import evaluation_preset
from deq_attacks.evaluation.shared_runs import shared_pgd_scores
from deq_attacks.gradients import ready_made
from deq_attacks.splits import held_out_data
from deq_attacks.training import preset, run_training
from deq_attacks.training.config import Device

ROOT = Path(__file__).resolve().parents[2]
#: The shared data beside the checkout (../shared) or beside its worktree folder.
MNIST = next(
    (p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared")
     if (p / "data" / "mnist_t10k.npz").is_file()),
    ROOT.parent / "shared",
) / "data" / "mnist_t10k.npz"
MNIST_CACHE = ROOT / "runs" / "benchmark_mnist_deq"
TARGET_VERDICT, TARGET_RACE, GOAL_STRONGEST = 0.3, 0.35, 1.5

BOUNDS: Bounds = (
    (
        ("verdict_vs_table", "verdict_vs_table_paper"),
        "Verdict mode pays the ready-made PGD on every test sample, the strongest column (BPTT "
        "AutoAttack) on its survivors, the cover on `cover_size` development images (default "
        "0: none) and the audit: every other column at its whole budget on 59 robust "
        "samples per defense (one coupled draw: a skipped shared PGD runs once on their "
        "union). With about 70% robust of 400 test digits the audit alone is about a fifth "
        "of the table; the larger the test split, the closer the ratio comes to the kept "
        "columns' share of the table.",
    ),
    (
        ("verdict_vs_strongest",),
        "The strongest column alone on every test sample is the least any honest per-sample "
        "verdict costs; verdict mode adds the ready-made PGD on every sample and the audit, "
        "a fixed cost (59 robust samples per defense facing the other columns) that only a "
        "larger test split dilutes.",
    ),
    (
        ("racing_vs_grid_demo", "racing_vs_grid_mnist"),
        "Successive halving attacks each of C candidates on 1 / 2^ceil(log2 C) of the split "
        "first and halves them as the images double, ties on accuracy broken by the rank "
        "sums of the attacked logits' margins so that every round halves: about "
        "(log2 C + 2) / (2 C) of the grid's candidate-images (0.19 for 16; more where the "
        "costlier candidates go on), and a candidate at 0% stops the family at once. In CPU "
        "time a round of a few images costs about a full batch's per-call work.",
    ),
)


def run(ctx: Context) -> list[Row]:
    quick = _is_quick(ctx.settings)
    estimator, n = demo_model(ctx.device.type, quick)
    held_out = held_out_data("digits")
    dev = held_out.subset(np.arange(n))
    many = 2 * n if quick else (len(held_out) - n) // 100 * 100
    test = held_out.subset(np.arange(n, n + many))
    base = dataclasses.replace(evaluation_defaults(), batch_size=100, sweep_mode=SweepMode.GRID)
    if quick:
        base = dataclasses.replace(base, **_QUICK_EVAL)
    workload = f"demo{' (quick)' if quick else ''}, {many} test digits"
    rows = _verdict_rows(estimator, (test.x, test.y), (dev.x, dev.y), base, workload)
    label = f"demo{' (quick)' if quick else ''}, {n} development digits"
    rows.append(_race_row("racing_vs_grid_demo", estimator, (dev.x, dev.y), base, label))
    if MNIST.is_file():
        mnist, mnist_dev = _mnist_model(ctx.device.type, quick)
        config = evaluation_preset("mnist").apply(dataclasses.replace(base, batch_size=100))
        if quick:
            config = dataclasses.replace(config, steps=2, step=0.15)
        label = f"MNIST DEQ{' (quick)' if quick else ''}, {len(mnist_dev[0])} dev images"
        rows.append(_race_row("racing_vs_grid_mnist", mnist, mnist_dev, config, label))
    rows.append(_paper_row())
    return rows


def _counted(deq: Any, fn: Any) -> tuple[Any, int, float]:
    """``fn()``, its f evaluations and its CPU seconds."""
    with counting_f(deq) as counter:
        start = time.process_time()
        value = fn()
        spent = time.process_time() - start
    return value, counter.total, spent


def _verdict_rows(
    estimator: DEQEstimator,
    test: tuple[np.ndarray, np.ndarray],
    dev: tuple[np.ndarray, np.ndarray],
    base: EvaluationConfig,
    workload: str,
) -> list[Row]:
    reports: dict[str, EvaluationReport] = {}
    for mode in (Mode.TABLE, Mode.VERDICT):
        reports[mode.value] = evaluate_model(
            estimator, test, dev, dataclasses.replace(base, mode=mode)
        )
    table, verdict = reports["table"], reports["verdict"]
    f_table, f_verdict = (r.timings["columns"]["f_evals"] for r in (table, verdict))
    cpu_table, cpu_verdict = (r.timings["columns"]["cpu_s"] for r in (table, verdict))
    whole = {k: sum(s.get("f_evals", 0) for n, s in r.timings.items()
                    if n in ("early_exit", "sweep", "clean", "columns", "measurements"))
             for k, r in reports.items()}  # fmt: skip
    pairs = disagreements(table, verdict)
    differing = len(pairs)
    record = "; ".join(
        f"{d} #{i}: table broken by {', '.join(cols)}" for d, i, cols in pairs[:12]
    ) + (f"; and {differing - 12} more" if differing > 12 else "")
    audits = "; ".join(
        f"{d}: kept {', '.join(a['kept'])} ({len(a['kept'])} of "
        f"{len(a['kept']) + len(a['skipped'])}), audit {a['size']} of {a['survivors']} "
        f"({a['shared']} shared by all defenses) broke {a['broken']}, escalated "
        f"{', '.join(a['escalated']) or 'none'}, bound {100 * a['bound']:.1f}%"
        for d, a in verdict.audit.items()
    )
    robust = ", ".join(f"{r.defense} {100 * r.accuracy:.0f}%" for r in verdict.robustness())
    rows: list[Row] = [
        Result(
            id="verdict_vs_table",
            ratio="verdict mode's column step (cover, kept columns, audit) / table "
            "mode's, in f evaluations",
            measured=f_verdict / f_table,
            target=TARGET_VERDICT,
            workload=workload,
            timed=f"evaluate_model's column step, demo model and settings, {len(test[0])} "
            f"test digits, {len(table.columns)} columns x 3 defenses",
            notes=f"verdicts differ on {differing} (defense, sample) pairs"
            f"{' (' + record + ')' if pairs else ''}; {audits}; "
            f"per-sample robust {robust}; f evaluations {f_verdict:,} vs {f_table:,}; CPU "
            f"{cpu_verdict:.0f} s vs {cpu_table:.0f} s (ratio {cpu_verdict / cpu_table:.2f}); "
            f"whole run {whole['verdict'] / whole['table']:.2f} in f evaluations",
            numerator=float(f_verdict),
            denominator=float(f_table),
            unit="f",
            samples=[f_verdict / f_table],
        )
    ]
    bptt = BackpropThroughSolver(checkpoint=base.bptt_checkpoint)
    only_aa = [a for a in base.attack_specs if a.name in ("pgd", "autoattack")]
    attacks = ",".join(attack_text(a) for a in only_aa)  # the base's AutoAttack budget
    columns = protocol_columns({"bptt": bptt}, dataclasses.replace(base, attacks=attacks))
    column = next(c for c in columns if c.label == "bptt AA")
    defenses = {"final": Final(), "early": Early(verdict.early_exit), "ensemble": Ensemble()}
    _, f_alone, cpu_alone = _counted(
        estimator.deq,
        lambda: column_scores(estimator, test[0], test[1], base, column, defenses),
    )
    rows.append(
        Result(
            id="verdict_vs_strongest",
            ratio="verdict mode's column step / the strongest column (bptt AA) alone on every "
            "test sample and defense, in f evaluations",
            measured=f_verdict / f_alone,
            target=GOAL_STRONGEST,
            workload=workload,
            timed="evaluate_model's column step in verdict mode vs column_scores of bptt AA",
            notes=f"f evaluations {f_verdict:,} vs {f_alone:,}; CPU {cpu_verdict:.0f} s vs "
            f"{cpu_alone:.0f} s (ratio {cpu_verdict / cpu_alone:.2f})",
            numerator=float(f_verdict),
            denominator=float(f_alone),
            unit="f",
            samples=[f_verdict / f_alone],
        )
    )
    return rows


def disagreements(
    table: EvaluationReport, verdict: EvaluationReport
) -> list[tuple[str, int, list[str]]]:
    """The (defense, test sample) pairs whose verdicts differ, each with the table's columns
    that broke the sample (empty where the table calls it robust and verdict mode does not:
    that cannot happen, every break verdict mode finds is the table's)."""
    out = []
    for d in table.defenses:
        differ = np.flatnonzero(table.verdict()[d] != verdict.verdict()[d])
        for i in differ.tolist():
            broke = [c for c, row in table.survived[d].items() if row[i] is False]
            out.append((d, i, broke))
    return out


def _race_row(
    id_: str,
    estimator: DEQEstimator,
    dev: tuple[np.ndarray, np.ndarray],
    config: EvaluationConfig,
    workload: str,
) -> Result:
    """The sweep of ``config`` on ``dev``, racing and grid, with n* from the ready-made PGD."""
    shards = Shards.current(config.attack_batch(estimator.device))
    ready = ready_made(estimator.deq.training_gradient)
    scored = shared_pgd_scores(
        estimator, ready, dev[0], dev[1], config.threat, {"final": Final()}, shards,
        seed=config.seed,
    )  # fmt: skip
    defenses = {
        "final": Final(),
        "early": Early(choose_early_exit(scored.states)),
        "ensemble": Ensemble(),
    }
    out: dict[str, tuple[Any, int, float]] = {}
    for mode in (SweepMode.GRID, SweepMode.RACING):
        out[mode.value] = _counted(estimator.deq, lambda mode=mode: run_sweep(
            estimator, config.sweep, dev[0], dev[1], config.threat, defenses, "early",
            shards, seed=config.seed, mode=mode,
        ))  # fmt: skip
    grid, f_grid, cpu_grid = out["grid"]
    race, f_race, cpu_race = out["racing"]
    chosen_grid, entries = grid.chosen, grid.entries
    chosen_race, raced = race.chosen, race.entries
    same = chosen_grid == chosen_race
    differ = "" if same else (
        "; chosen differ: "
        + ", ".join(f"{k}: grid {chosen_grid[k]!r} race {chosen_race.get(k)!r}"
                    for k in chosen_grid if chosen_grid[k] != chosen_race.get(k))
    )  # fmt: skip
    accuracy = {e["estimate"]: e["accuracy"]["early"] for e in entries}
    picked = ", ".join(
        f"{k}: grid {100 * accuracy[repr(chosen_grid[k])]:.1f}%, race's pick "
        f"{100 * accuracy[repr(chosen_race[k])]:.1f}% (early, whole dev split)"
        for k in chosen_grid
    )
    return Result(
        id=id_,
        ratio="racing sweep / grid sweep, in f evaluations",
        measured=f_race / f_grid,
        target=TARGET_RACE,
        workload=workload,
        timed=f"run_sweep over {len(entries)} candidates, eps {config.eps:g}, "
        f"{config.steps} steps, {len(dev[0])} development images",
        notes=f"same chosen attacks: {same}{differ}; {picked}; candidates raced "
        f"{len(raced)}; f evaluations {f_race:,} vs {f_grid:,}; CPU {cpu_race:.0f} s vs "
        f"{cpu_grid:.0f} s (ratio {cpu_race / max(cpu_grid, 1e-9):.2f})",
        numerator=float(f_race),
        denominator=float(f_grid),
        unit="f",
        samples=[f_race / f_grid],
    )


def _mnist_model(
    device: str, quick: bool
) -> tuple[DEQEstimator, tuple[np.ndarray, np.ndarray]]:
    """The demo preset trained briefly on MNIST (1,100 images, 3 clean epochs and one of
    PGD-AT at eps 0.1; cached in runs/benchmark_mnist_deq) and 200 development images of the
    file's held-out part."""
    config = preset("demo").updated(
        source=str(MNIST), device=Device(device), threads=None,
        train_limit=1100, epochs=4, plots=False,
    )  # fmt: skip
    if quick:
        config = config.updated(
            args={"channels": 4, "dropout": 0.0}, forward_threshold=3, epochs=1,
            pretrain_steps=1, adversarial=False, dev_size=12, train_limit=60, batch_size=20,
        )  # fmt: skip
    run_dir = MNIST_CACHE.with_name(MNIST_CACHE.name + ("_quick" if quick else ""))
    result = run_training(config, run_dir, log=lambda _text: None)
    deq = result.load_best()
    assert isinstance(deq, DEQ)
    estimator = DEQEstimator(
        deq, input_shape=result.image_shape, nb_classes=result.num_classes,
        device_type="gpu" if device == "cuda" else "cpu",
    )  # fmt: skip
    held_out = held_out_data(str(MNIST))
    size = 12 if quick else 200
    dev = held_out.subset(np.arange(len(held_out) - size, len(held_out)))
    return estimator, (dev.x, dev.y)


def _paper_row() -> Result:
    costs = paper_scale(0.5)
    return Result(
        id="verdict_vs_table_paper",
        ratio="verdict / table mode at the paper's scale, in f evaluations per test image "
        "(cost model)",
        measured=costs["verdict"] / costs["table"],
        target=TARGET_VERDICT,
        workload="cost model: cifar10_paper, DEQ-Large exact 8/7, 10,000 test and 100 "
        "development images, robust 50%",
        timed="benchmarks.paper_cost.paper_scale (no run)",
        notes=f"table {costs['table']:,.0f}, cascade {costs['cascade']:,.0f}, verdict "
        f"{costs['verdict']:,.0f} f evaluations per test image",
        numerator=costs["verdict"],
        denominator=costs["table"],
        unit="f",
        samples=[costs["verdict"] / costs["table"]],
    )
