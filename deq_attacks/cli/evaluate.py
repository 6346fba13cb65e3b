"""``deq-attacks evaluate``: the whole white-box protocol on a trained DEQ.

    deq-attacks evaluate --model small_conv_deq --model-arg in_channels=1 \
        --model-arg image_size=8 --threshold 8 --training-gradient phantom \
        --checkpoint runs/demo/checkpoint/best.safetensors --data digits --eps 0.1 --step 0.025

The model is a registered name or a user's ``package.module:function`` returning a DEQ; the
data is ``digits`` (embedded), an arrays file (``.npz``) or ``cifar10:ROOT`` (torchvision).
The development split (early exit, sweep) is the first ``--n-dev`` held-out images, the test
split the next ``--n-test``. Under ``torchrun --nproc_per_node=K`` the test samples are
sharded across the processes (gloo on CPU, NCCL on CUDA) and the results gathered.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deq_attacks.checkpoints import load_weights
from deq_attacks.config import add_dataclass_options, dataclass_from_options
from deq_attacks.data import ImageDataset, load_arrays_file, load_cifar10, load_digits
from deq_attacks.deq import DEQ, ImplicitGradient, PhantomGradient
from deq_attacks.evaluation import (
    EvaluationConfig,
    EvaluationReport,
    SweepConfig,
    evaluate_model,
    markdown_report,
    write_outputs,
)
from deq_attacks.evaluation.sweep import add_sweep_option
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.models import create_model
from deq_attacks.solvers import Broyden


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deq-attacks evaluate",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--model", required=True, help="registered name or package.module:func")
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword for the model builder (Python literal or string); repeatable",
    )
    parser.add_argument("--threshold", type=int, help="forward Broyden iterates (solver=...)")
    parser.add_argument(
        "--training-gradient",
        choices=["phantom", "exact"],
        help="the model's training gradient: phantom (k=5, lam=0.5) or exact (backward "
        "Broyden threshold-1); it fixes the ready-made attack",
    )
    parser.add_argument("--checkpoint", type=Path, help="safetensors weights")
    parser.add_argument("--data", default="digits", help="digits | FILE.npz | cifar10:ROOT")
    parser.add_argument("--n-dev", type=int, default=100, help="development images")
    parser.add_argument("--n-test", type=int, default=100, help="test images")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/evaluate"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_dataclass_options(parser, EvaluationConfig)
    add_sweep_option(parser)
    return parser


def held_out_data(spec: str) -> ImageDataset:
    """The held-out images of a data spec (never the training split)."""
    if spec == "digits":
        return load_digits().split(1200)[1]
    if spec.startswith("cifar10:"):
        return load_cifar10(spec.split(":", 1)[1], train=False)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--data {spec!r}: not 'digits', 'cifar10:ROOT' or a file")
    with np.load(path) as arrays:
        has_test = "x_test" in arrays.files
    return load_arrays_file(path, split="test" if has_test else None)


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["channels=16", "name=x"]`` -> ``{"channels": 16, "name": "x"}``."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def build_model(args: argparse.Namespace) -> DEQ:
    kwargs = parse_model_args(args.model_arg)
    if args.threshold is not None:
        kwargs["solver"] = Broyden(threshold=args.threshold, tol=1e-4)
    if args.training_gradient == "phantom":
        kwargs["training_gradient"] = PhantomGradient(5, 0.5)
    elif args.training_gradient == "exact":
        threshold = max(1, (args.threshold or 8) - 1)
        kwargs["training_gradient"] = ImplicitGradient(Broyden(threshold=threshold, tol=1e-4))
    model = create_model(args.model, **kwargs)
    if not isinstance(model, DEQ):
        raise TypeError(f"--model {args.model!r} built a {type(model).__name__}, not a DEQ")
    if args.checkpoint is not None:
        load_weights(model, args.checkpoint)
    return model


def check_sizes(data: ImageDataset, n_dev: int, n_test: int) -> None:
    """Raise unless ``data`` holds ``n_dev + n_test`` images (both at least 1)."""
    if n_dev < 1 or n_test < 1 or len(data) < n_dev + n_test:
        raise ValueError(f"{len(data)} held-out images for --n-dev {n_dev} + --n-test {n_test}")


def init_distributed(device: str) -> bool:
    """Join the torchrun process group if launched by torchrun; True if this process did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


STORE = "store.jsonl"
"""The result store in the output folder (finished steps and blocks; a rerun resumes from it)."""


def interrupted(out_dir: Path) -> str:
    """The message of an interrupted evaluation."""
    return (
        f"interrupted: every finished block is kept in {out_dir / STORE}; run the same command "
        "again to resume"
    )


def run(
    estimator: DEQEstimator,
    data: ImageDataset,
    config: EvaluationConfig,
    n_dev: int,
    n_test: int,
    out_dir: Path,
    description: dict[str, Any],
) -> EvaluationReport:
    """Split, evaluate, write the outputs (rank 0) and print the report."""
    check_sizes(data, n_dev, n_test)
    dev = data.subset(np.arange(n_dev))
    test = data.subset(np.arange(n_dev, n_dev + n_test))
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    start = time.perf_counter()
    report = evaluate_model(
        estimator,
        (test.x, test.y),
        (dev.x, dev.y),
        config,
        store_path=out_dir / STORE,
        description=description,
        progress=(lambda text: print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True))
        if main_process
        else None,
    )
    if main_process:
        title = f"White-box evaluation ({data.name}, {description.get('model', 'model')})"
        paths = write_outputs(report, out_dir, title)
        print("\n" + markdown_report(report, title))
        print(f"\nwall time {time.perf_counter() - start:.0f} s; written: "
              + ", ".join(str(p) for p in paths.values()))  # fmt: skip
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        sweep = SweepConfig.from_items(args.sweep)
        config = dataclass_from_options(EvaluationConfig, args, base=EvaluationConfig(sweep=sweep))
        data = held_out_data(args.data)
        check_sizes(data, args.n_dev, args.n_test)
        deq = build_model(args).to(args.device).eval()
    except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
        print(f"deq-attacks evaluate: {error}", file=sys.stderr)
        return 2
    distributed = init_distributed(args.device)
    try:
        estimator = DEQEstimator(
            deq,
            input_shape=data.x.shape[1:],
            nb_classes=int(data.num_classes or data.y.max() + 1),
            device_type="gpu" if args.device == "cuda" else "cpu",
        )
        description = {
            "model": args.model,
            "model_args": args.model_arg,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "data": args.data,
        }
        run(estimator, data, config, args.n_dev, args.n_test, args.out_dir, description)
    except KeyboardInterrupt:
        print(interrupted(args.out_dir), file=sys.stderr)
        return 130
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
