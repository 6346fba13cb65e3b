"""Robust accuracy under APGD-CE-100 with backprop through the solver vs the other estimates.

``python -m benchmarks.bptt_robustness [--out-dir DIR] [--n-test 100] [--max-iter 100]``

Trains (or resumes in ``--out-dir``) two small conv DEQs on the embedded digits the way the
README's main job (``python -m deq_attacks demo``) trains, through ``run_training`` and its
``demo`` preset: 16 channels, Broyden(8, tol 1e-4), the phantom training gradient (k=5,
lambda=0.5), Adam 3e-3 with cosine decay, batch 64, the best epoch by development PGD-10
accuracy; "main" is the preset (unrolled clean pretraining, then PGD-AT at eps 0.1, step
0.025, 10 steps), "clean" the same without PGD-AT. The early-exit step n is chosen on the
development split (best accuracy under the ready-made PGD-10, Sec. 6.2). Then, per model and
defense (Final, Early(n), Ensemble), ART's AutoProjectedGradientDescent (loss_type
"cross_entropy", L-inf eps 0.1, ``--max-iter`` iterations, one restart) runs on the test
images once per estimate; it differentiates ``estimator.model`` (the autograd path). Writes
``results.json`` and prints a table: accuracy per estimate, the best (lowest) other estimate,
and the per-sample worst case over the other estimates; with each defense, the median and
worst cosine of each other estimate's gradient with backprop through the solver
(``--alignment-only``: just those, into ``alignment.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent  # noqa: E402

from deq_attacks import (  # noqa: E402
    DEQ,
    Adjoint,
    BackpropThroughSolver,
    Broyden,
    DEQEstimator,
    Early,
    Ensemble,
    Exact,
    Final,
    GradientEnsemble,
    GradientEstimate,
    Phantom,
    Readout,
    Unrolled,
)
from deq_attacks.evaluation.alignment import gradient_alignment  # noqa: E402
from deq_attacks.gradients import ready_made  # noqa: E402
from deq_attacks.splits import held_out_data  # noqa: E402
from deq_attacks.training import preset, run_training  # noqa: E402
from deq_attacks.training.config import Device  # noqa: E402

THRESHOLD = 8
EPS, STEP = 0.1, 0.025
# name -> changes to the demo preset; "short" (not run by default): 2 clean epochs only
MODELS: dict[str, dict[str, Any]] = {
    "main": {},
    "clean": {"adversarial": False},
    "short": {"epochs": 2, "pretrain_steps": 34, "adversarial": False},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bptt_robustness"))
    parser.add_argument(
        "--data",
        default="digits",
        help="'digits' (embedded) or a 10-class arrays file, as for `python -m deq_attacks demo`",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["main", "clean"])
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--n-dev", type=int, default=100)
    parser.add_argument("--max-iter", type=int, default=100, help="APGD iterations")
    parser.add_argument("--batch-size", type=int, default=100, help="attack batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--defenses",
        nargs="+",
        choices=("final", "early", "ensemble"),
        default=["final", "early", "ensemble"],
    )
    parser.add_argument(
        "--others",
        nargs="+",
        default=None,
        help="labels of the other estimates to run (default all), e.g. exact phantom",
    )
    parser.add_argument(
        "--alignment-only",
        action="store_true",
        help="only the cosines of each estimate with backprop through the solver (no APGD)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    if min(args.n_test, args.n_dev, args.max_iter, args.batch_size, args.threads) < 1:
        parser.error("--n-test, --n-dev, --max-iter, --batch-size and --threads must be >= 1")
    return args


def other_estimates(early_n: int) -> dict[str, GradientEstimate]:
    """The package's other estimates: ready-made, intermediate (at z_1, the early exit and
    z_N) and the ensembles."""
    steps = sorted({1, early_n, THRESHOLD})
    return {
        "exact": Exact(Broyden(threshold=20, tol=1e-5)),
        "phantom": Phantom(5, 0.5),
        **{f"unrolled z_{n}": Unrolled(n=n, k=1, lam=1.0) for n in steps},
        **{f"adjoint z_{n}": Adjoint(n=n, beta=0.5) for n in sorted({early_n, THRESHOLD})},
        "ens. adjoint": GradientEnsemble(Adjoint(beta=0.5)),
        "ens. unrolled": GradientEnsemble(Unrolled(k=1, lam=1.0)),
    }


def trained_model(name: str, args: argparse.Namespace) -> DEQEstimator:
    """Model ``name`` trained by ``run_training`` into ``--out-dir``/name (a rerun resumes),
    with the weights of its best epoch, in eval mode."""
    config = preset("demo").updated(
        source=args.data,
        seed=args.seed,
        device=Device(args.device),
        threads=args.threads,
        **MODELS[name],
    )
    assert (config.model.forward_threshold, config.threat.eps, config.threat.step) == (
        THRESHOLD,
        EPS,
        STEP,
    )
    directory = args.out_dir / name
    result = run_training(config, directory)
    deq = result.load_best()
    if not isinstance(deq, DEQ):
        raise TypeError(f"the demo preset built a {type(deq).__name__}, not a DEQ")
    return DEQEstimator(
        deq,
        input_shape=result.image_shape,
        nb_classes=result.num_classes,
        device_type="gpu" if args.device == "cuda" else "cpu",
    )


def accuracy(estimator: DEQEstimator, x: np.ndarray, y: np.ndarray, defense: Readout) -> np.ndarray:
    """Per-sample correctness (B,) of ``defense`` on x."""
    with estimator.using(defense=defense):
        return estimator.predict(x, batch_size=len(x)).argmax(1) == y


def choose_early_exit(estimator: DEQEstimator, dev: Any) -> tuple[int, list[float]]:
    """n with the best development accuracy of Early(n) under the ready-made PGD-10 (one run
    with the training gradient's estimate; its steps never look at the defended output)."""
    ready = ready_made(estimator.deq.training_gradient)
    with estimator.using(estimate=ready):
        attack = ProjectedGradientDescent(
            estimator, eps=EPS, eps_step=STEP, max_iter=10, batch_size=len(dev.x), verbose=False
        )
        adv = attack.generate(dev.x, dev.y)
    accs = [
        float(accuracy(estimator, adv, dev.y, Early(n)).mean()) for n in range(1, THRESHOLD + 1)
    ]
    return int(np.argmax(accs)) + 1, accs


def apgd(
    estimator: DEQEstimator,
    estimate: GradientEstimate,
    defense: Readout,
    x: np.ndarray,
    y: np.ndarray,
    args: argparse.Namespace,
) -> np.ndarray:
    """Per-sample robustness (B,) of ``defense`` under APGD-CE with ``estimate``."""
    with estimator.using(estimate=estimate, defense=defense):
        attack = AutoProjectedGradientDescent(
            estimator,
            norm=np.inf,
            eps=EPS,
            eps_step=STEP,
            max_iter=args.max_iter,
            nb_random_init=1,
            batch_size=args.batch_size,
            loss_type="cross_entropy",
            verbose=False,
        )
        adv = attack.generate(x, y)
    assert np.abs(adv - x).max() <= EPS + 1e-6
    return accuracy(estimator, adv, y, defense)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    held_out = held_out_data(args.data)  # images the training pool leaves out
    if len(held_out) < args.n_dev + args.n_test:
        raise SystemExit(f"only {len(held_out)} held-out images for --n-dev + --n-test")
    dev = held_out.subset(np.arange(args.n_dev))
    test = held_out.subset(np.arange(args.n_dev, args.n_dev + args.n_test))
    out: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for name in args.models:
        start = time.perf_counter()
        estimator = trained_model(name, args)
        early_n, dev_accs = choose_early_exit(estimator, dev)
        estimator.predict(test.x, batch_size=len(test.x))
        trajectory = estimator.deq.last_trajectory
        assert trajectory is not None
        residual = float(trajectory.residuals[:, -1].median())
        defenses = {
            label: defense
            for key, label, defense in (
                ("final", "final", Final()),
                ("early", f"early z_{early_n}", Early(early_n)),
                ("ensemble", "ensemble", Ensemble()),
            )
            if key in args.defenses
        }
        others = other_estimates(early_n)
        if args.others is not None:
            unknown = sorted(set(args.others) - set(others))
            if unknown:
                raise SystemExit(f"unknown --others {unknown}; choose from {sorted(others)}")
            others = {k: v for k, v in others.items() if k in args.others}
        estimates = {"bptt": BackpropThroughSolver(), **others}
        rows: dict[str, Any] = {}
        for label, defense in defenses.items():
            with estimator.using(defense=defense):
                alignment = gradient_alignment(
                    estimator, others, test.x, test.y, args.batch_size
                ).to_json()["estimates"]
            if args.alignment_only:
                rows[label] = {"alignment": _cosine_summary(alignment)}
                print(f"[{name}] {label}: {json.dumps(rows[label])}", flush=True)
                continue
            robust = {
                est_name: apgd(estimator, estimate, defense, test.x, test.y, args)
                for est_name, estimate in estimates.items()
            }
            rest = {k: v for k, v in robust.items() if k != "bptt"}
            best_other = min(rest, key=lambda k: rest[k].mean())
            rows[label] = {
                "clean": float(accuracy(estimator, test.x, test.y, defense).mean()),
                "apgd": {k: float(v.mean()) for k, v in robust.items()},
                "best_other": best_other,
                "worst_case_others": float(np.logical_and.reduce(list(rest.values())).mean()),
                "worst_case_all": float(np.logical_and.reduce(list(robust.values())).mean()),
                "alignment": _cosine_summary(alignment),
            }
            print(f"[{name}] {label}: {json.dumps(rows[label])}", flush=True)
        out["models"][name] = {
            "median_relative_residual_z_N": residual,
            "early_exit": early_n,
            "dev_pgd10_accuracy_by_n": dev_accs,
            "defenses": rows,
            "seconds": time.perf_counter() - start,
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    filename = "alignment.json" if args.alignment_only else "results.json"
    (args.out_dir / filename).write_text(json.dumps(out, indent=2) + "\n")
    print(render(out))
    return out


def _cosine_summary(alignment: dict[str, Any]) -> dict[str, Any]:
    """name -> (median, worst) cosine with backprop through the solver."""
    return {name: [a["median"], a["worst"]] for name, a in alignment.items()}


def render(out: dict[str, Any]) -> str:
    """A markdown table: per model and defense, clean, BPTT, best other and worst cases."""
    lines = [
        "| model | residual z_N | defense | clean | BPTT | best other (which) | "
        "worst case others | worst case all |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, model in out["models"].items():
        for label, row in model["defenses"].items():
            if "apgd" not in row:
                continue
            best = row["best_other"]
            lines.append(
                f"| {name} | {model['median_relative_residual_z_N']:.3f} | {label} | "
                f"{row['clean']:.0%} | {row['apgd']['bptt']:.0%} | {row['apgd'][best]:.0%} "
                f"({best}) | {row['worst_case_others']:.0%} | {row['worst_case_all']:.0%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
