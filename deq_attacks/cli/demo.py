"""``deq-attacks``: train a DEQ and evaluate it white-box, ending with the result table.

The default runs in a few minutes on 2 CPU cores on scikit-learn's embedded digits (real 8x8
handwritten digits; no download): clean pretraining and PGD-AT of a small conv DEQ with the
unrolling (phantom) gradient, then the whole evaluation protocol at a small scale (early exit
and intermediate-attack sweep on a development split, PGD-10 and AutoAttack with every gradient
estimate, Square, per-sample worst case, diagnostics) against the final, early-exit and
ensemble defenses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deq_attacks.checkpoints import load_weights
from deq_attacks.cli.evaluate import interrupted, run
from deq_attacks.data import ImageDataset, load_arrays_file, load_digits
from deq_attacks.deq import DEQ, ImplicitGradient, PhantomGradient
from deq_attacks.evaluation import EvaluationConfig, SweepConfig
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.models import small_conv_deq
from deq_attacks.solvers import Broyden
from deq_attacks.training import TrainingConfig, train


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
        help="results, plot and checkpoints (a rerun resumes here)",
    )
    parser.add_argument("--n-test", type=int, default=100, help="test images attacked")
    parser.add_argument(
        "--n-dev", type=int, default=100, help="development images for the early-exit choice"
    )
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--threshold", type=int, default=8, help="forward Broyden iterates")
    parser.add_argument("--training-gradient", choices=["phantom", "exact"], default="phantom")
    parser.add_argument("--clean-epochs", type=int, default=6)
    parser.add_argument("--adv-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf budget (inputs in [0, 1])")
    parser.add_argument("--step", type=float, default=0.025, help="PGD step size")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations")
    parser.add_argument("--square-queries", type=int, default=100, help="Square queries")
    parser.add_argument(
        "--aa-iterations", type=int, default=5, help="AutoAttack APGD/FAB iterations"
    )
    parser.add_argument("--aa-queries", type=int, default=50, help="AutoAttack Square queries")
    parser.add_argument("--long-steps", type=int, default=50, help="PGD steps of the check")
    parser.add_argument("--attack-batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (the default small model is fastest on one)",
    )
    return parser


def load_data(spec: str) -> tuple[ImageDataset, ImageDataset]:
    """(train, held-out) splits of the chosen real data."""
    if spec == "digits":
        data = load_digits()
        return data.split(1200)
    path = Path(spec)
    with np.load(path) as arrays:
        keys = set(arrays.files)
    if {"x_train", "x_test"} <= keys:
        return load_arrays_file(path, split="train"), load_arrays_file(path, split="test")
    data = load_arrays_file(path)
    return data.split(int(0.8 * len(data)))


def build_model(args: argparse.Namespace, data: ImageDataset) -> DEQ:
    channels, size = data.x.shape[1], data.x.shape[2]
    gradient = (
        PhantomGradient(5, 0.5)
        if args.training_gradient == "phantom"
        else ImplicitGradient(Broyden(threshold=args.threshold - 1, tol=1e-4))
    )
    return small_conv_deq(
        in_channels=channels,
        num_classes=int(data.y.max()) + 1,
        channels=args.channels,
        image_size=size,
        solver=Broyden(threshold=args.threshold, tol=1e-4),
        training_gradient=gradient,
    )


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
        sweep=SweepConfig({"unrolled": {"k": "1,5", "lam": "1.0"}}),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    train_set, held_out = load_data(args.data)
    if len(held_out) < args.n_dev + args.n_test:
        print(
            f"only {len(held_out)} held-out images for --n-dev {args.n_dev} + --n-test "
            f"{args.n_test}",
            file=sys.stderr,
        )
        return 2
    dev, test = (
        held_out.subset(np.arange(args.n_dev)),
        held_out.subset(np.arange(args.n_dev, args.n_dev + args.n_test)),
    )
    deq = build_model(args, train_set).to(args.device)
    estimator = DEQEstimator(
        deq,
        input_shape=train_set.x.shape[1:],
        nb_classes=int(train_set.y.max()) + 1,
        optimizer=torch.optim.Adam(deq.parameters(), lr=args.lr),
        device_type="gpu" if args.device == "cuda" else "cpu",
    )
    config = TrainingConfig(
        clean_epochs=args.clean_epochs,
        adversarial_epochs=args.adv_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        eps=args.eps,
        step=args.step,
        steps=args.steps,
    )
    print(
        f"data {train_set.name}: {len(train_set)} training, {len(dev)} development, "
        f"{len(test)} test images; model: {sum(p.numel() for p in deq.parameters())} parameters"
    )
    state = train(
        estimator,
        train_set.x,
        train_set.y,
        config,
        checkpoint_dir=args.out_dir / "checkpoint",
        validation=(dev.x, dev.y),
    )
    load_weights(deq, args.out_dir / "checkpoint" / "best.safetensors")
    print(
        f"evaluating epoch {state.best_epoch} (best development PGD accuracy "
        f"{state.best_val_pgd_accuracy:.1%})"
    )
    try:
        run(
            estimator,
            held_out,
            demo_config(args),
            args.n_dev,
            args.n_test,
            args.out_dir,
            {
                "model": "small_conv_deq (demo)",
                "data": args.data,
                "training": vars(args).__repr__(),
            },
        )
    except KeyboardInterrupt:
        print(interrupted(args.out_dir), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
