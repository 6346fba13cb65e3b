"""Evaluate your own DEQ, path 2: a checkpoint of the official MDEQ (locuslab/deq) or of the
paper's code (minicheshire/DEQ-White-Box-Robustness), loaded into ``deq_large`` / ``deq_xl``.

The checkpoint is read with ``torch.load(weights_only=True)``; every key is mapped and every
shape checked before anything is loaded. The official CIFAR-10 training normalised the
inputs, so the estimator gets that normalisation as ART ``preprocessing``: attacks and clip
values stay in [0, 1] pixel space.

    python examples/own_deq_mdeq_checkpoint.py path/to/final_state.pth.tar --model deq_large \\
        --data ../shared/data/cifar10_subset.npz --images 16

Without a checkpoint the model keeps its random initialisation (the run then only shows the
pipeline, and says so).
"""

from __future__ import annotations

import argparse

import numpy as np
from art.attacks.evasion import ProjectedGradientDescent

from deq_attacks import Broyden, DEQEstimator, Early, Exact, Final
from deq_attacks.adapters import MDEQ_ORIGINS, load_mdeq_checkpoint, mdeq_origin
from deq_attacks.data import load_arrays_file, load_foolbox_samples
from deq_attacks.models import create_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="official MDEQ .pth / .pth.tar file")
    parser.add_argument("--model", choices=["deq_large", "deq_xl"], default="deq_large")
    parser.add_argument(
        "--origin", choices=list(MDEQ_ORIGINS),
        help="who trained the checkpoint (its key layout and its inputs: locuslab and torchdeq "
        "normalise CIFAR-10, minicheshire takes raw [0, 1] pixels); required with a checkpoint",
    )  # fmt: skip
    parser.add_argument("--data", help=".npz with x_test/y_test (default: foolbox's 20 images)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="PGD steps")
    args = parser.parse_args(argv)
    if args.checkpoint and args.origin is None:
        parser.error("--origin is required with a checkpoint: its inputs depend on who trained it")
    origin = mdeq_origin(args.origin or "minicheshire")

    deq = create_model(
        args.model, solver=Broyden(threshold=8), post_gn_affine=origin.layout == "torchdeq"
    )
    if args.checkpoint:
        load_mdeq_checkpoint(deq, args.checkpoint, layout=origin.layout)
        print(f"loaded {args.checkpoint} ({origin.source}) into {args.model}")
    else:
        print(f"no checkpoint given: {args.model} keeps random weights (pipeline demo only)")
    deq.eval()
    data = (
        load_arrays_file(args.data, split="test") if args.data else load_foolbox_samples("cifar10")
    )
    x, y = data.x[: args.images], data.y[: args.images]
    shape = (3, 1, 1)
    preprocessing = (
        None
        if origin.mean is None or origin.std is None
        else (np.reshape(origin.mean, shape), np.reshape(origin.std, shape))
    )
    print(f"inputs: {'raw [0, 1] pixels' if preprocessing is None else 'normalised'}")
    estimator = DEQEstimator(
        deq, input_shape=(3, 32, 32), nb_classes=10, preprocessing=preprocessing
    )
    for defense in (Final(), Early(4)):
        with estimator.using(estimate=Exact(), defense=defense):
            clean = (estimator.predict(x).argmax(1) == y).mean()
            pgd = ProjectedGradientDescent(
                estimator, eps=8 / 255, eps_step=2 / 255, max_iter=args.steps, verbose=False
            )
            robust = (estimator.predict(pgd.generate(x, y=y)).argmax(1) == y).mean()
        print(f"{defense}: clean {clean:.3f}, PGD-{args.steps} (Exact, 8/255) {robust:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
