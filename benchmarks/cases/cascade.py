"""Cascade mode against the full matrix on the demo's setting: the same per-sample verdict for
less attack work (issue 16.3).

The model is the demo's (the ``demo`` training preset: a small conv DEQ on the embedded
digits, clean pretraining then PGD-AT with the phantom gradient; trained once into
``runs/benchmark_cascade`` and reused) and the protocol runs with the demo's settings (the
``digits`` evaluation preset and the demo's sweep), once in table mode and once in cascade
mode, alternately. The ratio is the cascade's attack-column time, its ordering runs on the
development split included, over the full matrix's column time; the notes say whether the two
verdicts agree (every defense, every sample) and how many cells the cascade left unattacked.
This case uses the context's settings (quick, repeats, clock, device), not its workload.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from benchmarks.cases.common import Bounds, Context, Result, Row
from benchmarks.workloads import Settings
from deq_attacks import DEQ, DEQEstimator
from deq_attacks.cli.demo import evaluation_defaults
from deq_attacks.evaluation import EvaluationConfig, EvaluationReport, Mode, evaluate_model
from deq_attacks.splits import held_out_data
from deq_attacks.training import preset, run_training
from deq_attacks.training.config import Device

CACHE = Path(__file__).resolve().parents[2] / "runs" / "benchmark_cascade"
TARGET = 0.5

BOUNDS: Bounds = (
    (
        (
            "cascade_vs_full",
            "cascade_vs_full_eps0.2",
            "cascade_vs_full_all",
            "cascade_vs_full_eps0.2_all",
        ),
        "A sample that survives every column must be attacked by every column in both modes, "
        "so the cascade's time is at least about the robust fraction of the full matrix's "
        "(plus its ordering runs on the development split); it saves only on samples that an "
        "earlier, stronger column already broke. AutoAttack, the costliest column, already "
        "skips broken samples inside its own four attacks. On a batch of a few samples a "
        "column's cost is mostly its iterations' fixed work (Square's queries and APGD's "
        "iterations run one after the other, each a forward solve of the batch), so attacking "
        "9 samples instead of 100 saves far less than 91%; once a column's call holds several "
        "batches (the 400 held-out test digits) the saving follows the broken fraction.",
    ),
)

#: Smoke-mode changes: a tiny model trained for one epoch, a few images, tiny budgets.
_QUICK_TRAINING = {"args": {"channels": 4, "dropout": 0.0}, "forward_threshold": 3,
                   "epochs": 1, "pretrain_steps": 1,
                   "adversarial": False, "dev_size": 12, "train_limit": 60, "batch_size": 20,
                   "plots": False}  # fmt: skip
_QUICK_EVAL = {"steps": 2, "attacks": "pgd,autoattack:iterations=2,queries=5,square:queries=10",
               "long_steps": 3, "batch_size": 6, "diagnostic_samples": 2}  # fmt: skip


def demo_model(device: str, quick: bool, cache: Path = CACHE) -> tuple[DEQEstimator, int]:
    """The demo preset's trained model (best development-PGD checkpoint) as an estimator, and
    the number of test images to attack."""
    config = preset("demo").updated(device=Device(device), threads=None)
    if quick:
        config = config.updated(**_QUICK_TRAINING)
    run_dir = cache.with_name(cache.name + ("_quick" if quick else ""))
    result = run_training(config, run_dir, log=lambda _text: None)
    deq = result.load_best()
    assert isinstance(deq, DEQ)
    estimator = DEQEstimator(
        deq,
        input_shape=result.image_shape,
        nb_classes=result.num_classes,
        device_type="gpu" if device == "cuda" else "cpu",
    )
    return estimator, 12 if quick else 100


def _is_quick(settings: Settings) -> bool:
    return settings == Settings.quick(settings.repeats, settings.clock)


def run(ctx: Context) -> list[Row]:
    quick = _is_quick(ctx.settings)
    estimator, n = demo_model(ctx.device.type, quick)
    held_out = held_out_data("digits")
    dev = held_out.subset(np.arange(n))
    base = dataclasses.replace(evaluation_defaults(), batch_size=100)
    if quick:
        base = dataclasses.replace(base, **_QUICK_EVAL)
    eps_02 = dataclasses.replace(base, eps=0.2, step=0.05)

    def splits(n_test: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        test = held_out.subset(np.arange(n, n + n_test))
        return (test.x, test.y), (dev.x, dev.y)

    # the held-out digits after the development split (597 - 100), in whole batches of 100
    many = 2 * n if quick else (len(held_out) - n) // 100 * 100
    return [
        _row(ctx, estimator, splits(n), base, "cascade_vs_full", TARGET, quick),
        # the same model at twice the budget, where most samples fall: reported only
        _row(ctx, estimator, splits(n), eps_02, "cascade_vs_full_eps0.2", None, quick),
        # both on the held-out test digits in whole batches: a column's cost follows its
        # samples once its calls hold several batches (reported only)
        _row(ctx, estimator, splits(many), base, "cascade_vs_full_all", None, quick),
        _row(ctx, estimator, splits(many), eps_02, "cascade_vs_full_eps0.2_all", None, quick),
    ]


def _row(
    ctx: Context,
    estimator: DEQEstimator,
    splits: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    base: EvaluationConfig,
    id_: str,
    target: float | None,
    quick: bool,
) -> Result:
    """Table and cascade mode alternately, ``repeats`` times each, on ``base``'s settings."""
    (test, dev), n = splits, len(splits[0][0])
    reports: dict[str, list[EvaluationReport]] = {"table": [], "cascade": []}
    for repeat in range(ctx.settings.repeats):  # the order swapped every repetition
        for mode in ("table", "cascade")[:: 1 if repeat % 2 == 0 else -1]:
            config = dataclasses.replace(base, mode=Mode(mode))
            reports[mode].append(evaluate_model(estimator, test, dev, config))
    clock = "cpu_s" if ctx.settings.clock == "cpu" else "wall_s"
    full = [r.timings["columns"][clock] for r in reports["table"]]
    # the cascade's ordering runs are made inside its column step (and timed as "order" too)
    order = [r.timings.get("order", {}).get(clock, 0.0) for r in reports["cascade"]]
    cascade = [r.timings["columns"][clock] for r in reports["cascade"]]
    ratios = [c / f for c, f in zip(cascade, full)]
    table, casc = reports["table"][0], reports["cascade"][0]
    differing = sum(int((table.verdict()[d] != casc.verdict()[d]).sum()) for d in table.defenses)
    cells = sum(len(v) for row in casc.survived.values() for v in row.values())
    skipped = sum(v.count(None) for row in casc.survived.values() for v in row.values())
    robust = ", ".join(f"{r.defense} {100 * r.accuracy:.0f}%" for r in casc.robustness())
    return Result(
        id=id_,
        ratio="cascade mode's attack columns (with its development ordering runs) / the "
        "full matrix's",
        measured=float(np.median(ratios)),
        target=target,
        workload=f"demo{' (quick)' if quick else ''}, eps {base.eps:g}",
        timed="evaluate_model's column step on the demo's model and settings (small conv "
        f"DEQ, digits, {n} test images, {len(table.columns)} columns x 3 defenses), table "
        "vs cascade mode",
        notes=f"verdicts differ on {differing} (defense, sample) pairs; the cascade left "
        f"{skipped} of {cells} cells unattacked; per-sample robust {robust}; "
        f"{np.median(cascade):.1f} s (of which ordering {np.median(order):.1f} s) vs "
        f"{np.median(full):.1f} s ({'CPU' if clock == 'cpu_s' else 'wall'} clock)",
        numerator=float(np.median(cascade)),
        denominator=float(np.median(full)),
        unit="s",
        samples=ratios,
    )
