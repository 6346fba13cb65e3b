"""``deq-attacks``: train a DEQ and evaluate it white-box, ending with the result table.

The default runs in a few minutes on 2 CPU cores on scikit-learn's embedded digits (real 8x8
handwritten digits; no download): the ``demo`` training preset (clean pretraining of the
unrolled network, then PGD-AT of a small conv DEQ with the unrolling (phantom) gradient, the
best epoch by development PGD accuracy) through ``run_training``, then the whole evaluation
protocol at a small scale (early exit and intermediate-attack sweep on a development split,
PGD-10 and AutoAttack with every gradient estimate, Square, per-sample worst case,
diagnostics) against the final, early-exit and ensemble defenses.

Training draws only on the training pool of the data (the first 1,200 digits, or an arrays
file's ``x_train`` / first 80%); the evaluation's development and test images come from the
rest (``--n-dev`` then ``--n-test`` of them), so they never overlap what was trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deq_attacks.checkpoints import load_weights
from deq_attacks.cli.evaluate import interrupted, run
from deq_attacks.config import override, parse_pairs
from deq_attacks.deq import DEQ
from deq_attacks.evaluation import EvaluationConfig, SweepConfig
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.training import ConfigMismatchError, TrainConfig, preset, run_training
from deq_attacks.training.config import Device
from deq_attacks.training.data_loading import held_out_split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deq-attacks demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="digits",
        help="'digits' (embedded, default) or an arrays file (.npz) such as "
        "../shared/data/mnist_t10k.npz or cifar10_subset.npz",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/demo"),
        help="results and plots; the training run in OUT_DIR/training (a rerun resumes both)",
    )
    parser.add_argument("--n-test", type=int, default=100, help="test images attacked")
    parser.add_argument(
        "--n-dev", type=int, default=100, help="development images for the early-exit choice"
    )
    parser.add_argument(
        "--preset", default="demo", help="training preset (deq-attacks train --list-presets)"
    )
    parser.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one training setting of the preset (repeatable; any TrainConfig field, "
        "e.g. epochs=4, width=8, gradient=exact; deq-attacks train --help lists them)",
    )
    parser.add_argument(
        "--eps", type=float, default=0.1, help="L-inf budget of PGD-AT and the evaluation"
    )
    parser.add_argument("--step", type=float, default=0.025, help="PGD step size (both)")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations (both)")
    parser.add_argument("--square-queries", type=int, default=100, help="Square queries")
    parser.add_argument(
        "--aa-iterations", type=int, default=5, help="AutoAttack APGD/FAB iterations"
    )
    parser.add_argument("--aa-queries", type=int, default=50, help="AutoAttack Square queries")
    parser.add_argument("--long-steps", type=int, default=50, help="PGD steps of the check")
    parser.add_argument("--attack-batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of training and evaluation")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (the default small model is fastest on one)",
    )
    return parser


def training_config(args: argparse.Namespace) -> TrainConfig:
    """The preset with the demo's shared settings (data, threat model, seed, device, threads)
    and then ``--train-set`` applied; validated."""
    config = dataclasses.replace(
        preset(args.preset),
        data=args.data,
        eps=args.eps,
        step=args.step,
        steps=args.steps,
        seed=args.seed,
        device=Device(args.device),
        threads=args.threads,
    )
    return override(config, parse_pairs(args.train_set, "--train-set"))


#: The demo's sweep: every n with beta in {0.5, 1} (Adjoint) and k in {1, 5}, lambda 1 (Unrolled).
DEMO_SWEEP = SweepConfig({"unrolled": {"k": "1,5", "lam": "1.0"}})


def demo_config(args: argparse.Namespace) -> EvaluationConfig:
    """The whole protocol at the demo's scale: the AutoAttack's four attacks with
    ``--aa-iterations`` iterations, 2 target classes and ``--aa-queries`` Square queries (the
    standard: 100, 9, 5,000; recorded in the results as non-standard), Square with
    ``--square-queries``, PGD-``--long-steps`` for the more-steps check, and a sweep over
    every n with beta in {0.5, 1} (Adjoint) and k in {1, 5}, lambda 1 (Unrolled)."""
    return EvaluationConfig(
        eps=args.eps,
        step=args.step,
        steps=args.steps,
        aa_iterations=args.aa_iterations,
        aa_queries=args.aa_queries,
        aa_target_classes=2,
        square_queries=args.square_queries,
        long_steps=args.long_steps,
        large_eps=0.5,
        batch_size=args.attack_batch_size,
        seed=args.seed,
        sweep=DEMO_SWEEP,
    )


def _fail(message: object) -> int:
    print(f"deq-attacks demo: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available")
    try:
        config = training_config(args)
        evaluation = demo_config(args)
        held_out = held_out_split(config.data)
        if len(held_out) < args.n_dev + args.n_test:
            raise ValueError(
                f"only {len(held_out)} held-out images for --n-dev {args.n_dev} + --n-test "
                f"{args.n_test}"
            )
    except (ValueError, KeyError, FileNotFoundError) as error:
        return _fail(error)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # ART's random starts and Square draw from numpy
    run_dir = args.out_dir / "training"
    try:
        result = run_training(config, run_dir)
    except (ConfigMismatchError, ValueError, FileNotFoundError) as error:
        return _fail(error)
    deq = result.model
    if not isinstance(deq, DEQ):
        return _fail(f"the demo evaluates DEQs; preset {args.preset!r} trains {config.model}")
    state = result.state
    load_weights(deq, run_dir / "best.safetensors")
    deq.eval()
    print(
        f"evaluating epoch {state.best_epoch} (best development PGD accuracy "
        f"{state.best_dev_pgd_accuracy:.1%})"
    )
    estimator = DEQEstimator(
        deq,
        input_shape=result.image_shape,
        nb_classes=result.num_classes,
        device_type="gpu" if args.device == "cuda" else "cpu",
    )
    description = {
        "model": f"{config.model} ({args.preset} preset)",
        "data": args.data,
        "training": {"preset": args.preset, "changed": dict(parse_pairs(args.train_set))},
    }
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = held_out.subset(np.arange(args.n_dev))
    test = held_out.subset(np.arange(args.n_dev, args.n_dev + args.n_test))
    try:
        run(estimator, dev, test, evaluation, args.out_dir, description)
    except KeyboardInterrupt:
        print(interrupted(args.out_dir), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
