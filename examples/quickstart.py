"""Quickstart: train a small conv DEQ on real images, then attack it through ART.

Training uses ART's own trainers on the estimator: ``estimator.fit`` for the clean epochs,
then ``AdversarialTrainerMadryPGD`` (PGD-AT, its PGD with the training gradient's estimate),
with a cosine learning rate per epoch. The DEQ is wrapped as a ``DEQEstimator`` (an ART
``PyTorchClassifier``) and attacked with ART's ProjectedGradientDescent (which calls the
estimator's loss-aware ``loss_gradient``), AutoProjectedGradientDescent with the DLR loss and
AutoAttack (which differentiate ``estimator.model`` with autograd), and the query-based
SquareAttack. Each gradient attack is run once per gradient estimate, switched with
``estimator.using(estimate=...)``.

Default data: scikit-learn's 1,797 real 8x8 handwritten digits (no download), in [0, 1];
``--arrays PATH`` takes an ``.npz`` file instead (``x``/``y``, or ``x_train``/``y_train`` and
``x_test``/``y_test``), e.g. ../shared/data/mnist_t10k.npz or cifar10_subset.npz.

    python examples/quickstart.py
    python examples/quickstart.py --estimates unrolled-z1 exact adjoint --defense early:3
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from art.attacks import EvasionAttack
from art.attacks.evasion import (
    AutoAttack,
    AutoProjectedGradientDescent,
    ProjectedGradientDescent,
    SquareAttack,
)
from art.defences.trainer import AdversarialTrainerMadryPGD

from deq_attacks import (
    Adjoint,
    Broyden,
    DEQEstimator,
    Early,
    Ensemble,
    Exact,
    Final,
    GradientEnsemble,
    GradientEstimate,
    ImplicitGradient,
    Phantom,
    PhantomGradient,
    Readout,
    Unrolled,
    ready_made,
)
from deq_attacks.data import ImageDataset, load_arrays_file, load_digits
from deq_attacks.models import small_conv_deq

ESTIMATES: dict[str, Callable[[], GradientEstimate]] = {
    "unrolled-z1": lambda: Unrolled(n=1, k=1, lam=1.0),
    "exact": lambda: Exact(backward_solver=Broyden(threshold=20, tol=1e-5)),
    "phantom": lambda: Phantom(k=5, lam=0.5),
    "adjoint": lambda: Adjoint(beta=0.5),
    "ensemble-unrolled": lambda: GradientEnsemble(Unrolled(k=1, lam=1.0)),
    "ensemble-adjoint": lambda: GradientEnsemble(Adjoint(beta=0.5)),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", default=None, help="an .npz file of real images (default: "
                        "scikit-learn's 8x8 digits)")
    parser.add_argument("--n-train", type=int, default=1500, help="training images")
    parser.add_argument("--n-test", type=int, default=100, help="test images attacked")
    parser.add_argument("--channels", type=int, default=8, help="state channels (multiple of 4)")
    parser.add_argument("--threshold", type=int, default=6, help="forward Broyden iterates")
    parser.add_argument("--training-gradient", choices=["phantom", "implicit"], default="phantom")
    parser.add_argument("--epochs", type=int, default=4, help="clean training epochs")
    parser.add_argument("--adv-epochs", type=int, default=1, help="PGD-AT epochs after those")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf budget, inputs in [0, 1]")
    parser.add_argument("--steps", type=int, default=10, help="PGD/APGD iterations")
    parser.add_argument("--square-queries", type=int, default=100)
    parser.add_argument("--estimates", nargs="+", choices=sorted(ESTIMATES),
                        default=["unrolled-z1", "exact"])
    parser.add_argument("--defense", default="final",
                        help="'final', 'ensemble' or 'early:N' (the readout that is classified)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a model "
                        "this small gains nothing from more, and loses much on busy cores)")
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[ImageDataset, ImageDataset]:
    """(training images, test images), both real and disjoint."""
    if args.arrays is None:
        data = load_digits()
        name = f"sklearn digits, shuffled with seed {args.seed}"
        order = np.random.default_rng(args.seed).permutation(len(data))
        train_set, test_set = data.subset(order).split(len(data) - args.n_test)
    else:
        with np.load(args.arrays) as arrays:
            has_splits = "x_train" in arrays.files
        if has_splits:
            train_set = load_arrays_file(args.arrays, split="train")
            test_set = load_arrays_file(args.arrays, split="test")
        else:  # one split only (e.g. the MNIST test set): the last n_test images for testing
            data = load_arrays_file(args.arrays)
            train_set, test_set = data.split(len(data) - args.n_test)
        name = args.arrays
    return (
        train_set.subset(slice(0, args.n_train), name=f"{name}: training"),
        test_set.subset(slice(0, args.n_test), name=f"{name}: test"),
    )


def parse_defense(text: str) -> Readout:
    if text == "final":
        return Final()
    if text == "ensemble":
        return Ensemble()
    step = text.removeprefix("early:")
    if text.startswith("early:") and step.isdigit():
        return Early(int(step))
    raise SystemExit(f"--defense must be 'final', 'ensemble' or 'early:N', got {text!r}")


def accuracy(estimator: DEQEstimator, x: np.ndarray, y: np.ndarray) -> float:
    return float((estimator.predict(x, batch_size=len(x)).argmax(1) == y).mean())


def gradient_attacks(
    estimator: DEQEstimator, eps: float, steps: int, queries: int, batch: int
) -> dict[str, EvasionAttack]:
    """The gradient attacks, built against ``estimator`` (they read its current estimate)."""
    step = eps / 4

    def apgd(loss: str) -> AutoProjectedGradientDescent:
        return AutoProjectedGradientDescent(
            estimator, norm=np.inf, eps=eps, eps_step=step, max_iter=steps, nb_random_init=1,
            batch_size=batch, loss_type=loss, verbose=False,
        )

    return {
        f"PGD-{steps} (loss_gradient)": ProjectedGradientDescent(
            estimator, norm=np.inf, eps=eps, eps_step=step, max_iter=steps, num_random_init=1,
            batch_size=batch, verbose=False,
        ),
        f"APGD-DLR-{steps} (autograd)": apgd("difference_logits_ratio"),
        "AutoAttack (APGD-CE, APGD-DLR, Square)": AutoAttack(
            estimator, norm=np.inf, eps=eps, eps_step=step, batch_size=batch,
            attacks=[
                apgd("cross_entropy"),
                apgd("difference_logits_ratio"),
                SquareAttack(estimator, norm=np.inf, eps=eps, max_iter=queries,
                             batch_size=batch, verbose=False),
            ],
        ),
    }


def print_table(
    rows: dict[str, dict[str, float]], clean: float, args: argparse.Namespace, title: str
) -> None:
    """Rows: attacks; columns: estimates; last row: the minimum over attacks."""
    names = args.estimates
    worst = {n: min(cells[n] for cells in rows.values()) for n in names}
    lines = {"clean": dict.fromkeys(names, clean), **rows, "worst case (min over attacks)": worst}
    width = max(len(label) for label in lines) + 2
    header = f"{f'attack (L-inf eps={args.eps})':{width}}" + "".join(f"{n:>20s}" for n in names)
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for label, cells in lines.items():
        print(f"{label:{width}}" + "".join(f"{100 * cells[n]:>20.1f}" for n in names))


def train_with_art(estimator: DEQEstimator, train_set: ImageDataset,
                   args: argparse.Namespace) -> None:
    """``args.epochs`` clean epochs of ``estimator.fit``, then ``args.adv_epochs`` of ART's
    ``AdversarialTrainerMadryPGD`` (PGD-``args.steps``, eps, step eps/4, one random start),
    the adversaries made with the training gradient's estimate (Appendix A); Adam's learning
    rate follows a cosine over the epochs. (The paper's full recipe, resumable, with unrolled
    pretraining and the Jacobian penalty: ``deq_attacks.training.run_training``.)"""
    epochs = args.epochs + args.adv_epochs
    ready = ready_made(estimator.deq.training_gradient)
    for epoch in range(epochs):
        for group in estimator.optimizer.param_groups:
            group["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / epochs))
        with estimator.using(estimate=ready):
            if epoch < args.epochs:
                estimator.fit(train_set.x, train_set.y, batch_size=args.batch_size, nb_epochs=1,
                              verbose=False)
            else:
                AdversarialTrainerMadryPGD(
                    estimator, nb_epochs=1, batch_size=args.batch_size, eps=args.eps,
                    eps_step=args.eps / 4, max_iter=args.steps,
                ).fit(train_set.x, train_set.y)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    defense = parse_defense(args.defense)
    defense.check(args.threshold)  # e.g. Early(n) needs n <= threshold; fail before training
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # ART's random starts and Square draw from numpy
    start, cpu_start = time.perf_counter(), time.process_time()
    train_set, test_set = load_data(args)
    channels, size = train_set.image_shape[0], train_set.image_shape[1]
    classes = train_set.num_classes or int(max(train_set.y.max(), test_set.y.max())) + 1
    print(f"data: {train_set.name.split(':')[0]}; {len(train_set)} training and {len(test_set)} "
          f"test images of shape {train_set.image_shape}, {classes} classes")

    training_gradient = (
        PhantomGradient(k=5, lam=0.5)
        if args.training_gradient == "phantom"
        else ImplicitGradient(Broyden(threshold=max(1, args.threshold - 1), tol=1e-4))
    )
    deq = small_conv_deq(
        in_channels=channels, num_classes=classes, channels=args.channels, image_size=size,
        solver=Broyden(threshold=args.threshold, tol=1e-4), training_gradient=training_gradient,
    )
    estimator = DEQEstimator(
        deq, input_shape=train_set.image_shape, nb_classes=classes,
        optimizer=torch.optim.Adam(deq.parameters(), lr=args.lr),
    )
    train_with_art(estimator, train_set, args)
    deq.eval()
    estimator.defense = defense

    x, y = test_set.x, test_set.y
    onehot = np.eye(classes, dtype=np.float32)[y]
    clean = accuracy(estimator, x, y)
    residual = float(deq.relative_residuals()[:, -1].mean())
    print(f"clean accuracy of the {estimator.defense} defense: {100 * clean:.1f}%, "
          f"mean relative residual at z_{args.threshold}: {residual:.3f}")

    rows: dict[str, dict[str, float]] = {}  # attack label -> estimate name -> accuracy
    for name in args.estimates:
        with estimator.using(estimate=ESTIMATES[name]()):
            attacks = gradient_attacks(estimator, args.eps, args.steps, args.square_queries,
                                       len(x))
            for label, attack in attacks.items():
                calls = estimator.white_box.backward_calls
                t = time.perf_counter()
                acc = accuracy(estimator, attack.generate(x, onehot), y)
                calls = estimator.white_box.backward_calls - calls
                rows.setdefault(label, {})[name] = acc
                print(f"  {label:40s} {name:18s} {100 * acc:5.1f}%  "
                      f"({calls} estimate backward calls, {time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    square = SquareAttack(estimator, norm=np.inf, eps=args.eps, max_iter=args.square_queries,
                          batch_size=len(x), verbose=False)
    square_acc = accuracy(estimator, square.generate(x, onehot), y)
    print(f"  Square-{args.square_queries} (no gradient): {100 * square_acc:.1f}% "
          f"({time.perf_counter() - t:.0f} s)")
    rows[f"Square-{args.square_queries} (query, no gradient)"] = dict.fromkeys(
        args.estimates, square_acc
    )
    print_table(rows, clean, args, f"Accuracy (%) of the {estimator.defense} defense on "
                f"{len(x)} test images ({test_set.name});\ncolumns: the gradient estimate each "
                "attack receives")
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall, "
          f"{time.process_time() - cpu_start:.0f} s CPU")


if __name__ == "__main__":
    main()
