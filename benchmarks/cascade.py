"""Cascade mode against the full matrix on the demo's setting: the same per-sample verdict for
a fraction of the attack work.

The model is the demo's (``deq-attacks demo``: a small conv DEQ on the embedded digits, clean
pretraining then PGD-AT with the phantom gradient; trained here once and cached) and the
protocol runs with the demo's settings, once in table mode and once in cascade mode. The ratio
is the cascade's attack-column time, its ordering runs on the development split included,
over the full matrix's column time, from the same process; the rows say whether the two
verdicts agree (every defense, every sample) and how many cells the cascade left unattacked.

    python -m benchmarks.cascade [--quick] [--out benchmarks/results/cascade.json]

``cascade_vs_full(ctx)`` is a case of ``benchmarks.run`` (it uses the context's settings for
``quick``, repeats and device, not its workload: the setting is the demo's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/cascade.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.cases import Context, Result  # noqa: E402
from benchmarks.workloads import Settings, workloads  # noqa: E402
from deq_attacks.checkpoints import load_weights  # noqa: E402
from deq_attacks.cli import demo  # noqa: E402
from deq_attacks.evaluation import EvaluationReport, Mode, evaluate_model  # noqa: E402
from deq_attacks.interfaces import DEQEstimator  # noqa: E402
from deq_attacks.training import TrainingConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "benchmark_cascade"
TARGET = 0.5

#: The demo's options (its defaults), and a smoke version of them.
DEMO_ARGS: list[str] = []
QUICK_ARGS = ["--n-test", "12", "--n-dev", "12", "--channels", "4", "--threshold", "3",
              "--clean-epochs", "1", "--adv-epochs", "0", "--steps", "2", "--square-queries",
              "10", "--aa-iterations", "2", "--aa-queries", "5", "--long-steps", "2",
              "--attack-batch-size", "6"]  # fmt: skip


def demo_model(args: argparse.Namespace, cache: Path, device: torch.device) -> tuple:
    """The demo's trained model (trained into ``cache`` once: training resumes there) and its
    (development, test) splits."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    train_set, held_out = demo.load_data(args.data)
    deq = demo.build_model(args, train_set).to(device)
    estimator = DEQEstimator(
        deq,
        input_shape=train_set.x.shape[1:],
        nb_classes=int(train_set.y.max()) + 1,
        optimizer=torch.optim.Adam(deq.parameters(), lr=args.lr),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )
    config = TrainingConfig(
        clean_epochs=args.clean_epochs, adversarial_epochs=args.adv_epochs,
        batch_size=args.batch_size, lr=args.lr, eps=args.eps, step=args.step, steps=args.steps,
    )  # fmt: skip
    train(estimator, train_set.x, train_set.y, config, checkpoint_dir=cache,
          validation=(held_out.x[: args.n_dev], held_out.y[: args.n_dev]))  # fmt: skip
    load_weights(deq, cache / "best.safetensors")
    deq.eval()
    dev = held_out.subset(np.arange(args.n_dev))
    test = held_out.subset(np.arange(args.n_dev, args.n_dev + args.n_test))
    return estimator, (dev.x, dev.y), (test.x, test.y)


def cascade_vs_full(ctx: Context, cache: Path = CACHE, eps: float | None = None) -> list[Result]:
    """The benchmark case (see the module docstring); ``eps`` replaces the demo's attack budget
    (the model stays the demo's, trained at its eps)."""
    quick = ctx.settings == Settings.quick(ctx.settings.repeats, ctx.settings.clock)
    args = demo.build_parser().parse_args(QUICK_ARGS if quick else DEMO_ARGS)
    cache = cache.with_name(cache.name + ("_quick" if quick else ""))
    estimator, dev, test = demo_model(args, cache / "checkpoint", ctx.device)
    base = demo.demo_config(args)
    if eps is not None:
        base = dataclasses.replace(base, eps=eps, step=eps / 4)
    reports: dict[str, list[EvaluationReport]] = {"table": [], "cascade": []}
    for repeat in range(ctx.settings.repeats):  # the order swapped every repetition
        for mode in ("table", "cascade")[:: 1 if repeat % 2 == 0 else -1]:
            config = dataclasses.replace(base, mode=Mode(mode))
            reports[mode].append(evaluate_model(estimator, test, dev, config))
    clock = "cpu_s" if ctx.settings.clock == "cpu" else "wall_s"
    full = [r.timings["columns"][clock] for r in reports["table"]]
    order = [r.timings["order"][clock] for r in reports["cascade"]]
    cascade = [r.timings["columns"][clock] + o for r, o in zip(reports["cascade"], order)]
    ratios = [c / f for c, f in zip(cascade, full)]
    table, casc = reports["table"][0], reports["cascade"][0]
    differing = sum(int((table.verdict()[d] != casc.verdict()[d]).sum()) for d in table.defenses)
    cells = sum(len(v) for row in casc.survived.values() for v in row.values())
    skipped = sum(v.count(None) for row in casc.survived.values() for v in row.values())
    robust = ", ".join(f"{r.defense} {100 * r.accuracy:.0f}%" for r in casc.robustness())
    return [
        Result(
            id="cascade_vs_full" if eps is None else f"cascade_vs_full_eps{eps:g}",
            ratio="cascade mode's attack columns (with its development ordering runs) / the "
            "full matrix's",
            measured=float(np.median(ratios)),
            target=TARGET if eps is None else None,
            workload="demo"
            + (" (quick)" if quick else "")
            + ("" if eps is None else f", eps {eps:g}"),
            timed="evaluate_model's column step on the demo's model and settings (small conv "
            f"DEQ, digits, {len(test[0])} test images, {len(table.columns)} columns x 3 "
            "defenses), table vs cascade mode",
            notes=f"verdicts differ on {differing} (defense, sample) pairs; the cascade left "
            f"{skipped} of {cells} cells unattacked; per-sample robust {robust}; "
            f"{np.median(cascade):.1f} s (of which ordering {np.median(order):.1f} s) vs "
            f"{np.median(full):.1f} s ({'CPU' if clock == 'cpu_s' else 'wall'} clock); "
            f"per-repeat ratios {min(ratios):.3f}..{max(ratios):.3f}",
            numerator=float(np.median(cascade)),
            denominator=float(np.median(full)),
            unit="s",
            samples=ratios,
        )
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny model and budgets")
    parser.add_argument("--repeats", type=int, default=1, help="table/cascade pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="cpu",
        help="the process's CPU seconds (CPU only; robust to other jobs with --threads 1) or wall",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "cascade.json"
    )
    parser.add_argument("--cache", type=Path, default=CACHE, help="the trained model's folder")
    parser.add_argument("--eps", type=float, default=None, help="another attack budget")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu does not see GPU time: use --clock wall with --device cuda")
    settings = (
        Settings.quick(args.repeats, args.clock)
        if args.quick
        else Settings(repeats=args.repeats, clock=args.clock)
    )
    ctx = Context(workloads(args.quick)["small"], settings, torch.device(args.device))
    start = time.perf_counter()
    rows = [row.to_json() for row in cascade_vs_full(ctx, args.cache, args.eps)]
    data = {
        "command": "python -m benchmarks.cascade "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    for row in rows:
        print(f"{row['id']}: {row['measured']:.3f} (target {row['target']}): {row['notes']}")
    return data


if __name__ == "__main__":
    main()
