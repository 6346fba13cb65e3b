"""What ``evaluate``, ``demo`` and ``train`` do once their options are parsed and validated
(their modules build the options without torch; torch is imported here)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import Namespace

from deq_attacks.cli.options import fail, settings
from deq_attacks.data import ImageDataset
from deq_attacks.deq import DEQ
from deq_attacks.deq.contract import DEQModel
from deq_attacks.distributed import is_main_process, process_group
from deq_attacks.evaluation import (
    EvaluationConfig,
    EvaluationReport,
    evaluate_model,
    markdown_report,
    write_outputs,
)
from deq_attacks.evaluation.cost import describe_cost
from deq_attacks.evaluation.protocol import estimate_cost
from deq_attacks.evaluation.store import StoreBusyError
from deq_attacks.interfaces import DEQEstimator, art_device_type
from deq_attacks.interfaces.inputs import check_model_fits
from deq_attacks.model_spec import ModelSpec, build_model
from deq_attacks.splits import (
    EvaluationSplit,
    choose_split,
    evaluation_pool,
    held_out_data,
    parse_range,
    read_indices,
)
from deq_attacks.training import ConfigMismatchError, TrainConfig, preset, run_training
from deq_attacks.training.config import Device
from deq_attacks.training.resume import read_state

STORE = "store.jsonl"
"""The result store in the output folder (finished steps and blocks; a rerun resumes from it)."""

_DEV_NAME = "--n_dev / --dev_range / --dev_indices"
_TEST_NAME = "--n_test / --test_range / --test_indices"


def interrupted(out_dir: Path) -> str:
    """The message of an interrupted evaluation."""
    return (
        f"interrupted: every finished block is kept in {out_dir / STORE}; run the same command "
        "again to resume"
    )


def training_interrupted(run_dir: Path) -> str:
    """The message of an interrupted training run (the last finished epoch is kept)."""
    state = read_state(run_dir) if (run_dir / "state.json").exists() else None
    if state is None or state.checkpoint is None:
        return f"interrupted: no epoch had finished in {run_dir}; run the same command to start"
    return (
        f"interrupted: {run_dir} is kept after epoch {state.epochs_done} "
        f"({run_dir / 'checkpoints' / state.checkpoint}); run the same command again to resume"
    )


def progress_since(start: float) -> Callable[[str], None] | None:
    """The protocol's progress callback: each step printed with the seconds since ``start``,
    by the main process (None in the others: silent)."""
    if not is_main_process():
        return None
    return lambda text: print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)


def publish(
    report: EvaluationReport, test: ImageDataset, description: dict[str, Any], out_dir: Path,
    start: float,
) -> None:  # fmt: skip
    """Write the outputs of ``report`` (evaluated on ``test``) and print it, by the main
    process, with the wall time since ``start``."""
    if not is_main_process():
        return
    title = f"White-box evaluation ({test.name}, {description.get('model', 'model')})"
    paths = write_outputs(report, out_dir, title)
    print("\n" + markdown_report(report, title))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; written: "
          + ", ".join(str(p) for p in paths.values()))  # fmt: skip


# --- evaluate -------------------------------------------------------------------------------


def select_split(args: Namespace) -> EvaluationSplit:
    """The development and test splits the data options ask for, validated."""
    pool = evaluation_pool(args.data)
    chosen: dict[str, np.ndarray | None] = {}
    for split in ("dev", "test"):
        text, path = args[f"{split}_range"], args[f"{split}_indices"]
        if text is not None and path is not None:
            raise ValueError(f"give --{split}_range or --{split}_indices, not both")
        if text is not None:
            chosen[split] = parse_range(text, len(pool), f"--{split}_range")
        elif path is not None:
            chosen[split] = read_indices(path, len(pool), f"--{split}_indices")
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


def evaluate(args: Namespace, config: EvaluationConfig) -> int:
    """``deq-attacks evaluate`` with parsed options and a validated config: the split, the
    model (checked against the data) and the protocol; the exit code."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("evaluate", "--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        split = select_split(args)
        spec = settings(ModelSpec, args.model)
        data = split.pool.data
        built = build_model(spec, data.image_shape, data.num_classes)
        if not isinstance(built.model, DEQModel):
            raise TypeError(f"evaluate takes DEQs; model {spec.name} trains with autograd")
        deq = built.model.to(args.device)
        labels = np.concatenate([data.y[split.dev_indices], data.y[split.test_indices]])
        sample = torch.from_numpy(data.x[split.dev_indices[:1]]).to(args.device)
        classes = check_model_fits(deq, sample, labels, data.name, data.num_classes)
        if config.entropy_settings is not None:  # a round of the defense fits the solver
            config.entropy_settings.rounds(deq.solver.threshold)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
        return fail("evaluate", error)
    print(split.summary())
    for note in built.notes:
        print(note)
    with process_group(args.device):  # the torchrun group, when launched by torchrun
        estimator = DEQEstimator(
            deq,
            input_shape=split.pool.data.image_shape,
            nb_classes=classes,
            device_type=art_device_type(args.device),
        )
        description = {
            "model": spec.name,
            "model_args": spec.args,
            "data": args.data,
            "preset": args.preset,
            "input_shape": list(deq.input_shape) if deq.input_shape is not None else None,
            "split": split.record(),
            **built.record,
        }
        if args.dry_run:
            cost = estimate_cost(
                estimator, (split.test.x, split.test.y), (split.dev.x, split.dev.y), config
            )
            print(f"expected cost ({config.mode.value} mode, {len(split.test.x)} test and "
                  f"{len(split.dev.x)} development images):")  # fmt: skip
            if not cost["countable"]:
                print("  unknown: the model has no f module whose evaluations can be counted")
                return 0
            print(describe_cost(cost["steps"], cost["seconds_per_f"]))
            if cost["bound"]:
                print("  (columns: at most; a broken sample costs less)")
            if cost["unknown_columns"]:
                print("  columns of unknown cost: " + ", ".join(cost["unknown_columns"]))
            return 0
        try:
            start = time.perf_counter()
            report = evaluate_model(
                estimator, (split.test.x, split.test.y), (split.dev.x, split.dev.y), config,
                store_path=args.out_dir / STORE, description=description,
                progress=progress_since(start),
            )  # fmt: skip
            publish(report, split.test, description, args.out_dir, start)
        except KeyboardInterrupt:
            print(interrupted(args.out_dir), file=sys.stderr)
            return 130
        except (StoreBusyError, OSError) as error:  # another run on the folder; a full disk
            return fail("evaluate", error)
    return 0


# --- demo -----------------------------------------------------------------------------------


def demo(
    args: Namespace, config: TrainConfig, evaluation: EvaluationConfig, kernels: str | None
) -> int:
    """``deq-attacks demo`` with validated settings: train (or resume) with ``config``, then
    the protocol with ``evaluation`` on held-out development and test images; ``kernels``: the
    pinned CPU kernels (None: the CPU's own), recorded with the results."""
    if config.execution.device is Device.CUDA and not torch.cuda.is_available():
        return fail("demo", "device cuda: no CUDA device is available")
    try:
        held_out = held_out_data(config.data.source)
    except (ValueError, FileNotFoundError) as error:
        return fail("demo", error)
    if len(held_out) < args.n_dev + args.n_test:
        return fail(
            "demo",
            f"only {len(held_out)} held-out images for --n_dev {args.n_dev} + --n_test "
            f"{args.n_test}",
        )
    if config.execution.threads is not None:
        torch.set_num_threads(config.execution.threads)
    if kernels is not None:
        print(
            f"CPU kernels pinned to {kernels}, one thread: a rerun on this machine repeats its "
            "numbers; other CPUs fall in a range (--native_kernels true: this CPU's own)"
        )
    torch.manual_seed(config.execution.seed)
    np.random.seed(config.execution.seed)  # ART's random starts and Square draw from numpy
    run_dir = args.out_dir / "training"
    try:
        result = run_training(config, run_dir)
    except (ConfigMismatchError, ValueError, FileNotFoundError) as error:
        return fail("demo", error)
    except KeyboardInterrupt:
        print(training_interrupted(run_dir), file=sys.stderr)
        return 130
    deq = result.model
    if not isinstance(deq, DEQ):
        message = f"the demo evaluates DEQs; preset {args.preset!r} trains {config.model.name}"
        return fail("demo", message)
    state = result.state
    result.load_best()
    print(
        f"evaluating epoch {state.best_epoch} (best development PGD accuracy "
        f"{state.best_dev_pgd_accuracy:.1%})"
    )
    estimator = DEQEstimator(
        deq,
        input_shape=result.image_shape,
        nb_classes=result.num_classes,
        device_type=art_device_type(config.execution.device.value),
    )
    start = preset(args.preset).flat()
    changed = {k: v for k, v in config.flat().items() if v != start[k]}
    description = {
        "model": f"{config.model.name} ({args.preset} preset)",
        "data": config.data.source,
        "training": {"preset": args.preset, "changed": changed},
        "cpu_kernels": kernels or f"native ({torch.backends.cpu.get_cpu_capability()})",
    }
    torch.manual_seed(evaluation.seed)
    np.random.seed(evaluation.seed)
    dev = held_out.subset(np.arange(args.n_dev))
    test = held_out.subset(np.arange(args.n_dev, args.n_dev + args.n_test))
    try:
        begun = time.perf_counter()
        report = evaluate_model(
            estimator, (test.x, test.y), (dev.x, dev.y), evaluation,
            store_path=args.out_dir / STORE, description=description,
            progress=progress_since(begun),
        )  # fmt: skip
        publish(report, test, description, args.out_dir, begun)
    except KeyboardInterrupt:
        print(interrupted(args.out_dir), file=sys.stderr)
        return 130
    except (StoreBusyError, OSError) as error:  # another run on the folder; a full disk
        return fail("demo", error)
    return 0


# --- train ----------------------------------------------------------------------------------


def train(config: TrainConfig, out_dir: Path) -> int:
    """``deq-attacks train`` with a validated config: the run (resumed if it exists)."""
    if config.execution.device is Device.CUDA and not torch.cuda.is_available():
        return fail(
            "train",
            "device=cuda, but torch sees no CUDA device (the paper presets are for GPUs; "
            "--device cpu runs them on the CPU)",
        )
    try:
        result = run_training(config, out_dir)
    except (FileNotFoundError, ValueError) as error:  # a resume mismatch is a ValueError
        return fail("train", error)
    except KeyboardInterrupt:
        print(training_interrupted(out_dir), file=sys.stderr)
        return 130
    state = result.state
    if state.best_epoch is not None:
        print(
            f"best epoch {state.best_epoch} (dev PGD accuracy {state.best_dev_pgd_accuracy:.1%}): "
            f"{result.run_dir / 'best.safetensors'}"
        )
    return 0
