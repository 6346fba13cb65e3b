"""What every paper script shares: the presets (paper / cpu / tiny: options, model kinds,
training and evaluation settings, splits), the cache of trained models and of protocol runs,
and the layout of the results (the paper's tables, JSON + markdown, beside the paper's numbers).

A script composes ``deq_attacks.training.run_training`` and ``deq_attacks.evaluation``
(``evaluate_model`` and its report; ``column_scores`` for a single column outside the
protocol); it does not reimplement them. Trained models live in ``<cache>/<kind>-<hash of the
config>`` (resumable: a second script asking for the same config finds the finished run at
once), and protocol results in ``<cache>/eval-<hash>.jsonl`` (``evaluate_model``'s store: it
resumes from it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from jsonargparse import ArgumentParser, Namespace

from deq_attacks.checkpoints import load_weights
from deq_attacks.cli import options
from deq_attacks.data import ImageDataset
from deq_attacks.deq import DEQ
from deq_attacks.evaluation import (
    EvaluationConfig,
    EvaluationReport,
    SweepConfig,
    evaluate_model,
)
from deq_attacks.evaluation.columns import BPTT
from deq_attacks.evaluation.splits import held_out_data
from deq_attacks.evaluation.store import jsonable
from deq_attacks.gradients import GradientEstimate, Phantom, ready_made
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.records import plain, to_jsonable
from deq_attacks.training import RunResult, TrainConfig, preset, run_training
from deq_attacks.training.config import DEFAULT_SOLVER, RUN_ONLY_KEYS, Device, Gradient

T = TypeVar("T")
PRESETS = ("paper", "cpu", "tiny")
#: Processes for a script's independent protocol runs: the CPU preset's two cores (one thread
#: each: these small models gain nothing from a second thread); one GPU runs one at a time.
DEFAULT_JOBS = {"paper": 1, "cpu": 2, "tiny": 1}
DEFAULT_CACHE = Path("runs/paper_cache")

#: Training preset per model kind for --preset paper (CIFAR-10, DEQ-Large unless named).
PAPER_KINDS = {
    "exact": "deq_large_exact_8_7",
    "exact_18_20": "deq_large_exact_18_20",
    "exact_30_30": "deq_large_exact_30_30",
    "exact_50_50": "deq_large_exact_50_50",
    "unrolling": "deq_large_unrolling",
    "unrolling_xl": "deq_xl_unrolling",
    "baseline": "resnet18_pgd_at",
    "baseline_xl": "wrn34_10_pgd_at",
}
CPU_KINDS = {"exact": "cpu_exact", "unrolling": "cpu_unrolling", "clean": "cpu_clean"}

#: Paper presets' GPU hours on one RTX 3090, from the paper's Table 10 throughput (see
#: docs/training.md "Expected GPU time"); XL and the baselines: several times DEQ-Large.
PAPER_GPU_HOURS = {
    "deq_large_unrolling": 46,
    "deq_large_exact_8_7": 57,
    "deq_large_exact_18_20": 73,
    "deq_large_exact_30_30": 216,
    "deq_large_exact_50_50": 312,
}


def parser(description: str) -> ArgumentParser:
    """The options every paper script takes (a script adds its own), with ``--config FILE``:
    ``--train.FIELD`` / ``--eval.FIELD`` change that ``TrainConfig`` / ``EvaluationConfig``
    setting for every model trained / every evaluation (only the settings given count)."""
    p = options.new_parser(None, description)
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="paper (GPU) | cpu | tiny")
    p.add_argument("--out_dir", "--out-dir", type=Path | None,
                   help="results (null: runs/paper/<preset>/<script>)")  # fmt: skip
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="trained models, shared")
    p.add_argument("--data", default="digits", help="cpu/tiny: digits or an .npz arrays file")
    p.add_argument("--data_root", "--data-root", type=Path, default=Path("data"),
                   help="paper: CIFAR-10 root")  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], help="null: the preset's")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument(
        "--jobs",
        type=int | None,
        help="independent runs (protocols, models to train) at once, each in a process "
        f"(null: {', '.join(f'{k} {v}' for k, v in DEFAULT_JOBS.items())})",
    )
    options.add_settings(p, TrainConfig, "train", title="--train.FIELD: a setting for every "
                         "model trained (only those given: each replaces the preset's)")
    options.add_settings(p, EvaluationConfig, "eval", skip={"sweep"}, title="--eval.FIELD: a "
                         "setting for every evaluation (only those given: each replaces the "
                         "preset's)")  # fmt: skip
    return p


def parse(p: ArgumentParser, argv: Sequence[str] | None) -> Namespace:
    """The options of ``argv``, with ``train`` and ``eval`` holding only the settings given
    (field -> typed value). A bad option or value is a ``SystemExit`` with its message."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = options.parse(p, args_list)
        args.train = options.given_settings(p, args_list, TrainConfig, "train")
        args.eval = options.given_settings(p, args_list, EvaluationConfig, "eval")
    except options.CommandError as error:
        raise SystemExit(str(error)) from None
    return args


@dataclass(frozen=True)
class Setup:
    """The resolved options of one script run."""

    preset: str
    out_dir: Path
    cache: Path
    data: str
    data_root: Path
    device: str
    train_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    threads: int = 1
    jobs: int = 1

    @classmethod
    def from_args(cls, args: Namespace, name: str) -> Setup:
        """From ``parse``'s namespace; ``name`` names the default output folder."""
        if args.preset != "paper" and args.data != "digits" and not Path(args.data).is_file():
            raise SystemExit(f"--data {args.data!r}: not 'digits' and not a file")
        jobs = DEFAULT_JOBS[args.preset] if args.jobs is None else args.jobs
        if args.threads < 1 or jobs < 1:
            raise SystemExit(f"--threads and --jobs must be >= 1, got {args.threads}, {jobs}")
        torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if args.preset == "paper" else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda (the paper preset's default): no CUDA device here")
        out = args.out_dir or Path("runs/paper") / args.preset / name
        return cls(args.preset, out, args.cache, args.data, args.data_root, device,
                   dict(args.train), dict(args.eval), args.threads, jobs)  # fmt: skip


def train_config(setup: Setup, kind: str, **changes: Any) -> TrainConfig:
    """The training config of model ``kind`` (exact, unrolling, clean, baseline, ...) for the
    preset, with ``changes`` (TrainConfig fields) applied."""
    if setup.preset == "paper":
        if kind == "clean":
            base = dataclasses.replace(preset(PAPER_KINDS["exact"]), adversarial=False)
        elif kind in PAPER_KINDS:
            base = preset(PAPER_KINDS[kind])
        else:
            raise ValueError(f"no paper model {kind!r}; kinds: {sorted(PAPER_KINDS)} + clean")
        base = dataclasses.replace(base, data_root=setup.data_root, device=Device(setup.device))
    else:
        if kind == "baseline":
            base = dataclasses.replace(
                preset("cpu_exact"), model="resnet18", width=8, dropout=None,
                gradient=Gradient.AUTOGRAD, pretrain_steps=0, jac_weight=0.0,
            )  # fmt: skip
        elif kind.startswith("exact_"):
            forward, backward = (int(v) for v in kind.split("_")[1:])
            base = dataclasses.replace(
                preset("cpu_exact"), forward_threshold=forward, backward_threshold=backward
            )
        elif kind in CPU_KINDS:
            base = preset(CPU_KINDS[kind])
        else:
            raise ValueError(f"no cpu model {kind!r}; kinds: {sorted(CPU_KINDS)}, baseline")
        base = dataclasses.replace(base, data=setup.data, device=Device(setup.device))
        if setup.preset == "tiny":
            base = dataclasses.replace(
                base, width=8 if base.is_deq else 4, train_limit=60, dev_size=20, epochs=1,
                batch_size=20, pretrain_steps=1, steps=2, eval_batch_size=20,
                spectral_samples=2, plots=False,
            )  # fmt: skip
    return dataclasses.replace(base, **{**setup.train_settings, **changes})


#: TrainConfig fields added after models were cached: left out of the hash at their default,
#: so that the models cached before them are found again.
_LATER_FIELDS = {"forward_solver": DEFAULT_SOLVER, "backward_solver": DEFAULT_SOLVER}


def config_hash(config: TrainConfig) -> str:
    values = {
        k: v
        for k, v in to_jsonable(config).items()
        if k not in RUN_ONLY_KEYS and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def train_cached(setup: Setup, kind: str, **changes: Any) -> RunResult:
    """Train (or find, already trained) model ``kind`` in the shared cache; its model holds
    the best checkpoint's weights (by dev PGD), in eval mode."""
    config = train_config(setup, kind, **changes)
    if setup.preset == "paper":
        name = PAPER_KINDS.get(kind, kind)
        print(f"[paper] {name}: expected about {PAPER_GPU_HOURS.get(name, 'several x 50')} "
              "GPU hours on one RTX 3090 (docs/training.md)")  # fmt: skip
    run_dir = setup.cache / f"{kind}-{config_hash(config)}"
    started = time.perf_counter()
    result = run_training(config, run_dir, log=lambda text: print(f"  [{kind}] {text}"))
    load_weights(result.model, run_dir / "best.safetensors")
    result.model.eval()
    print(f"  [{kind}] model ready in {time.perf_counter() - started:.0f} s ({run_dir})")
    return result


def estimator(result: RunResult, data: ImageDataset, setup: Setup) -> DEQEstimator:
    """The ART estimator of a trained DEQ (defense and estimate switched by the protocol)."""
    model = result.model
    if not isinstance(model, DEQ):
        raise TypeError(f"{type(model).__name__} is not a DEQ")
    return DEQEstimator(
        model,
        input_shape=data.x.shape[1:],
        nb_classes=int(data.num_classes or data.y.max() + 1),
        device_type="gpu" if setup.device == "cuda" else "cpu",
    )


def held_out(setup: Setup) -> ImageDataset:
    """Images no training run saw: the CIFAR-10 test set (paper), the digits past the training
    pool, an arrays file's test split, or the last 20% of a file without one (training draws
    from the first 80%)."""
    return held_out_data(f"cifar10:{setup.data_root}" if setup.preset == "paper" else setup.data)


#: Development / test images per preset.
SPLITS = {"paper": (1000, 9000), "cpu": (100, 200), "tiny": (10, 20)}


def eval_config(setup: Setup, autoattack: bool | None = None, **changes: Any) -> EvaluationConfig:
    """The protocol's settings: the paper's (standard AutoAttack); on CPU eps 0.1 (the
    training eps of the digits), the default sweep grid, no AutoAttack unless asked; table
    mode. ``autoattack`` adds (True) or drops (False) the AutoAttack columns (None: the
    preset's); ``changes`` are EvaluationConfig fields. The attack batch is resolved for the
    device (recorded in the results)."""
    if setup.preset == "paper":
        base = EvaluationConfig()
    elif setup.preset == "cpu":
        base = EvaluationConfig(
            eps=0.1, step=0.025, attacks="pgd,square", aa_iterations=10, aa_target_classes=1,
            aa_queries=100, square_queries=300, long_steps=50, diagnostic_samples=16,
        )  # fmt: skip
    else:
        base = EvaluationConfig(
            eps=0.1, step=0.025, steps=2, attacks="pgd,square", aa_iterations=2,
            aa_target_classes=1, aa_queries=5, square_queries=10, long_steps=3,
            diagnostic_samples=2, batch_size=20,
            sweep=SweepConfig({"adjoint": {"n": "1,2", "beta": "1.0"},
                               "unrolled": {"n": "1,2", "k": "1", "lam": "1.0"}}),
        )  # fmt: skip
    config = dataclasses.replace(base, **setup.eval_settings)
    if autoattack is not None:
        config = dataclasses.replace(config, attacks=with_autoattack(config.attacks, autoattack))
    config = dataclasses.replace(config, **changes)
    if config.batch_size is None:
        config = dataclasses.replace(
            config, batch_size=config.attack_batch(torch.device(setup.device))
        )
    return config


def with_autoattack(attacks: str, on: bool) -> str:
    """The attack list ``attacks`` with the standard AutoAttack after the PGD (on) or without
    it (off)."""
    names = [n for n in attacks.split(",") if n.strip() and n.strip() != "autoattack"]
    if on:
        names.insert(names.index("pgd") + 1, "autoattack")
    return ",".join(names)


def splits(setup: Setup, data: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """(development, test): the first n_dev held-out images, then the next n_test."""
    n_dev, n_test = SPLITS[setup.preset]
    n_test = min(n_test, len(data) - n_dev)
    if n_test < 1:
        raise SystemExit(f"{len(data)} held-out images: too few for {n_dev} development ones")
    return data.subset(np.arange(n_dev)), data.subset(np.arange(n_dev, n_dev + n_test))


def protocol_extras(result: RunResult) -> dict[str, GradientEstimate]:
    """Extra columns so both 'final' attacks of the paper's tables exist: the phantom gradient
    (k=5, lambda=0.5) when the model's ready-made attack is the exact gradient."""
    model = result.model
    assert isinstance(model, DEQ)
    if ready_made(model.training_gradient) == Phantom(5, 0.5):
        return {}
    return {"phantom": Phantom(5, 0.5)}


def run_protocol(
    setup: Setup, kind: str, config: EvaluationConfig | None = None, **train_changes: Any
) -> tuple[RunResult, EvaluationReport]:
    """The whole protocol on model ``kind``, cached in the shared folder (a second script with
    the same model and settings reads it back at once)."""
    result = train_cached(setup, kind, **train_changes)
    data = held_out(setup)
    dev, test = splits(setup, data)
    config = config or eval_config(setup)
    extras = protocol_extras(result)
    key = json.dumps(
        [result.run_dir.name, to_jsonable(config), len(dev), len(test), sorted(extras)]
    )
    path = setup.cache / f"eval-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"
    started = time.perf_counter()
    report = evaluate_model(
        estimator(result, data, setup), (test.x, test.y), (dev.x, dev.y), config,
        store_path=path, extra_estimates=extras,
        description={"kind": kind, "run": str(result.run_dir)},
        progress=lambda text: print(f"  [{kind} eval {time.perf_counter() - started:5.0f} s] "
                                    f"{text}", flush=True),
    )  # fmt: skip
    return result, report


def in_processes(jobs: int, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> Iterator[T]:
    """``fn(*args)`` for each args in ``calls``, results in order: here one after another when
    ``jobs`` is 1, else in up to ``jobs`` spawned processes (``fn`` must be importable)."""
    if jobs == 1 or len(calls) <= 1:
        yield from (fn(*args) for args in calls)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=context) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        yield from (future.result() for future in futures)


def run_protocols(
    setup: Setup, runs: Sequence[tuple[str, EvaluationConfig]]
) -> list[tuple[RunResult, EvaluationReport]]:
    """``run_protocol`` for each (kind, config). With ``setup.jobs`` > 1 the runs first go to
    that many processes, each filling the cache (its model trained if need be); then each is
    read back here."""
    if setup.jobs > 1 and len(runs) > 1:
        list(in_processes(setup.jobs, _protocol_job, [(setup, k, c) for k, c in runs]))
    return [run_protocol(setup, kind, config) for kind, config in runs]


def _protocol_job(setup: Setup, kind: str, config: EvaluationConfig) -> None:
    torch.set_num_threads(setup.threads)
    run_protocol(setup, kind, config)


def pct(value: float) -> float:
    """A fraction in [0, 1] as a percentage rounded to 2 decimals."""
    return round(100.0 * float(value), 2)


def column_accuracy(report: EvaluationReport) -> dict[str, dict[str, float]]:
    """defense -> column label -> accuracy (%), plus 'clean'."""
    matrix = report.matrix()
    out: dict[str, dict[str, float]] = {}
    for d, row in zip(matrix.defenses, matrix.column_accuracy(), strict=True):
        out[d] = {"clean": pct(np.mean(report.clean[d]))}
        out[d].update({c: pct(v) for c, v in zip(matrix.columns, row, strict=True)})
    return out


def find_column(columns: Sequence[str], prefix: str, suffix: str = "PGD") -> str:
    """The one column label starting with ``prefix`` and ending with ``suffix``."""
    found = [c for c in columns if c.startswith(prefix) and c.endswith(suffix)]
    if len(found) != 1:
        raise KeyError(f"no single column {prefix}..{suffix} among {list(columns)}")
    return found[0]


def paper_layout(report: EvaluationReport, attack: str = "PGD") -> list[dict[str, Any]]:
    """Table 2/3/6's layout: per defense, clean, then the simultaneous adjoint's final,
    intermediate and ensemble attacks, then the unrolled intermediates' three; then two columns
    the paper does not have: backprop through the solver (when run) and the worst of every
    column of this attack kind and Square (the protocol's white-box robustness per defense)."""
    acc = column_accuracy(report)
    labels = list(next(iter(acc.values())))
    exact_trained = "phantom PGD" in labels
    sources = {
        "adjoint final": "ready-made " if exact_trained else "exact ",
        "adjoint intermediate": "adjoint z_",
        "adjoint ensemble": "ens. adjoint ",
        "unrolled final": "phantom " if exact_trained else "ready-made ",
        "unrolled intermediate": "unrolled z_",
        "unrolled ensemble": "ens. unrolled ",
    }
    rows = []
    for defense, cells in acc.items():
        row: dict[str, Any] = {"defense": defense, "clean": cells["clean"]}
        for name, prefix in sources.items():
            row[name] = cells[find_column(labels, prefix, attack)]
        if any(c.startswith(BPTT) for c in labels):
            row["bptt (ours)"] = cells[find_column(labels, f"{BPTT} ", attack)]
        row["worst (ours)"] = min(
            v for c, v in cells.items() if c.endswith(f" {attack}") or c == "square"
        )
        rows.append(row)
    return rows


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows (dicts) as a markdown table; the columns are every key in first-seen order, a row
    without one leaves its cell empty."""
    if not rows:
        return "(empty)"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        text = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells]
        lines.append("| " + " | ".join(text) + " |")
    return "\n".join(lines)


def write_results(
    setup: Setup,
    title: str,
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    paper: Mapping[str, Sequence[Mapping[str, Any]]],
    started: float,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``results.json`` and ``results.md`` (measured tables, then the paper's, labelled
    "paper") into the out dir, print the markdown, return the JSON."""
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter() - started
    payload = {
        "title": title,
        "preset": setup.preset,
        "data": "cifar10" if setup.preset == "paper" else setup.data,
        "wall_seconds": round(wall, 1),
        "measured": {k: list(v) for k, v in tables.items()},
        "paper": {k: list(v) for k, v in paper.items()},
        "notes": list(notes),
        "train_settings": plain(dict(setup.train_settings)),
        "eval_settings": plain(dict(setup.eval_settings)),
        **(dict(extra) if extra else {}),
    }
    (setup.out_dir / "results.json").write_text(json.dumps(jsonable(payload), indent=2))
    parts = [f"# {title}", f"preset `{setup.preset}`, data `{payload['data']}`, "
             f"wall time {wall:.0f} s", ""]  # fmt: skip
    for name, rows in tables.items():
        parts += [f"## measured: {name}", "", markdown(rows), ""]
    for name, rows in paper.items():
        parts += [f"## paper (CIFAR-10, DEQ-Large/XL): {name}", "", markdown(rows), ""]
    changed = plain({**setup.train_settings, **setup.eval_settings})
    parts += [f"- {n}" for n in notes]
    parts += [f"- changed from the preset: {changed}"] if changed else []
    text = "\n".join(parts) + "\n"
    (setup.out_dir / "results.md").write_text(text)
    print(text)
    return payload


def main_wrapper(run: Callable[[Setup], Any], description: str, name: str) -> Callable[..., int]:
    """A ``main(argv)`` that parses the common options and calls ``run(setup)``."""

    def main(argv: Sequence[str] | None = None) -> int:
        run(Setup.from_args(parse(parser(description), argv), name))
        return 0

    return main


def diagnostic_notes(title: str, report: EvaluationReport) -> list[str]:
    """One line per diagnostic of the protocol: verdict and sentence."""
    return [f"{title}: {c.name} [{c.verdict}] {c.message}" for c in report.diagnostics]
