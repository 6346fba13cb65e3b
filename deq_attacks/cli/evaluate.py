"""``deq-attacks evaluate``: the whole white-box protocol on a trained DEQ.

    deq-attacks evaluate --model small_conv_deq --model-arg in_channels=1 \
        --model-arg image_size=8 --threshold 8 --training-gradient phantom \
        --checkpoint runs/demo/training/best.safetensors --data digits --preset digits

    deq-attacks evaluate --model mymodels:build --checkpoint model.pt --data mnist_t10k.npz \
        --preset mnist --dev-range 8000:8100 --test-range 8100:9100

The model is a registered name or a user's ``package.module:function`` (imported from the
working directory) returning a DEQ; see docs/own_deq.md for the builder contract. The data is
``digits`` (embedded), an arrays file (``.npz``) or ``cifar10:ROOT`` (torchvision's test set).
The development split (early exit, sweep) and the test split are ranges or index files into
that data, or by default the first ``--n-dev`` and next ``--n-test`` images of the part that
training does not use (the digits past 1,200, a file's test split, or the last 20% of a file
without one); the split used is printed and recorded in the results. ``--preset`` sets the
threat model and budgets of a data set; explicit options override it. Under ``torchrun
--nproc_per_node=K`` the test samples are sharded across the processes (gloo on CPU, NCCL on
CUDA) and the results gathered.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deq_attacks.cli.model_options import add_model_options, build_model
from deq_attacks.config import add_dataclass_options, dataclass_from_options
from deq_attacks.data import ImageDataset
from deq_attacks.deq.contract import DEQModel
from deq_attacks.distributed import process_group
from deq_attacks.evaluation import (
    EvaluationConfig,
    EvaluationReport,
    SweepConfig,
    evaluate_model,
    markdown_report,
    write_outputs,
)
from deq_attacks.evaluation.presets import PRESETS, evaluation_preset
from deq_attacks.evaluation.splits import (
    EvaluationSplit,
    choose_split,
    evaluation_pool,
    parse_range,
    read_indices,
)
from deq_attacks.evaluation.sweep import add_sweep_option
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.models.registry import working_directory_on_path

_DEV_NAME = "--n-dev / --dev-range / --dev-indices"
_TEST_NAME = "--n-test / --test-range / --test-indices"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deq-attacks evaluate",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_model_options(parser)
    data = parser.add_argument_group("data and splits")
    data.add_argument("--data", default="digits", help="digits | FILE.npz | cifar10:ROOT")
    data.add_argument("--n-dev", type=int, help="development images (default 100 held-out)")
    data.add_argument("--n-test", type=int, help="test images (default the next 100 held-out)")
    for split in ("dev", "test"):
        data.add_argument(
            f"--{split}-range",
            metavar="START:STOP",
            help=f"the {split} images START..STOP-1 of the data (e.g. 9800:10000)",
        )
        data.add_argument(
            f"--{split}-indices",
            type=Path,
            metavar="FILE",
            help=f"the {split} images listed in FILE (.npy, or text with one index per line)",
        )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="threat model and budgets: "
        + "; ".join(f"{name}: {p.summary}" for name, p in PRESETS.items()),
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/evaluate"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_dataclass_options(parser, EvaluationConfig)
    add_sweep_option(parser)
    return parser


def held_out_data(spec: str) -> ImageDataset:
    """The images of a data spec that training does not use (never the training split)."""
    pool = evaluation_pool(spec)
    return pool.data.subset(pool.held_out)


def select_split(args: argparse.Namespace) -> EvaluationSplit:
    """The development and test splits the data options ask for, validated."""
    pool = evaluation_pool(args.data)
    chosen: dict[str, np.ndarray | None] = {}
    for split in ("dev", "test"):
        text, path = getattr(args, f"{split}_range"), getattr(args, f"{split}_indices")
        if text is not None and path is not None:
            raise ValueError(f"give --{split}-range or --{split}-indices, not both")
        if text is not None:
            chosen[split] = parse_range(text, len(pool), f"--{split}-range")
        elif path is not None:
            chosen[split] = read_indices(path, len(pool), f"--{split}-indices")
        else:
            chosen[split] = None
    return choose_split(
        pool,
        dev=chosen["dev"],
        test=chosen["test"],
        n_dev=args.n_dev,
        n_test=args.n_test,
        names=(_DEV_NAME, _TEST_NAME),
    )


def check_model_fits_data(model: DEQModel, split: EvaluationSplit, device: str) -> int:
    """Refuse data the model was not built for, before any work; return its class count.

    Checks the declared ``input_shape``, runs one development image through the model, and
    checks that every label has a logit (and the data's class count, when known, equals the
    model's).
    """
    data = split.pool.data
    sample = data.image_shape
    if model.input_shape is not None and tuple(model.input_shape) != sample:
        raise ValueError(
            f"the model was built for samples of shape {tuple(model.input_shape)} "
            f"(its input_shape), but {data.name} has {sample}: choose the model or data that "
            "fit (e.g. --model-arg image_size=... for small_conv_deq)"
        )
    x = torch.from_numpy(data.x[split.dev_indices[:1]]).to(device)
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    except Exception as error:  # any failure of the user's model on this data: say which
        raise ValueError(
            f"the model does not run on one image of {data.name} (shape {sample}): "
            f"{type(error).__name__}: {error}"
        ) from None
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise ValueError(f"the model returns shape {tuple(logits.shape)}, not logits (B, classes)")
    classes = int(logits.shape[1])
    labels = np.concatenate([data.y[split.dev_indices], data.y[split.test_indices]])
    if int(labels.max()) >= classes:
        raise ValueError(
            f"{data.name} has label {int(labels.max())}, but the model has {classes} outputs"
        )
    if data.num_classes is not None and data.num_classes != classes:
        raise ValueError(
            f"{data.name} has {data.num_classes} classes, but the model has {classes} outputs"
        )
    return classes


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
    dev: ImageDataset,
    test: ImageDataset,
    config: EvaluationConfig,
    out_dir: Path,
    description: dict[str, Any],
) -> EvaluationReport:
    """Evaluate on ``test`` (choices on ``dev``), write the outputs (rank 0), print the report."""
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
        title = f"White-box evaluation ({test.name}, {description.get('model', 'model')})"
        paths = write_outputs(report, out_dir, title)
        print("\n" + markdown_report(report, title))
        print(f"\nwall time {time.perf_counter() - start:.0f} s; written: "
              + ", ".join(str(p) for p in paths.values()))  # fmt: skip
    return report


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    """The preset (if any), then every option given explicitly."""
    base = EvaluationConfig(sweep=SweepConfig.from_items(args.sweep))
    if args.preset is not None:
        base = evaluation_preset(args.preset).apply(base)
    return dataclass_from_options(EvaluationConfig, args, base=base)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with working_directory_on_path():
        try:
            config = evaluation_config(args)
            split = select_split(args)
            built = build_model(args)
            deq = built.model.to(args.device)
            classes = check_model_fits_data(deq, split, args.device)
        except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"deq-attacks evaluate: {message}", file=sys.stderr)
            return 2
        print(split.summary())
        for note in built.notes:
            print(note)
        with process_group(args.device):  # the torchrun group, when launched by torchrun
            estimator = DEQEstimator(
                deq,
                input_shape=split.pool.data.image_shape,
                nb_classes=classes,
                device_type="gpu" if args.device == "cuda" else "cpu",
            )
            description = {
                "model": args.model,
                "model_args": args.model_arg,
                "data": args.data,
                "preset": args.preset,
                "input_shape": list(deq.input_shape) if deq.input_shape is not None else None,
                "split": split.record(),
                **built.record,
            }
            try:
                run(estimator, split.dev, split.test, config, args.out_dir, description)
            except KeyboardInterrupt:
                print(interrupted(args.out_dir), file=sys.stderr)
                return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
