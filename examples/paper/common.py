"""What the paper scripts share, all of it the paper's own: the options every script takes,
which training preset each model kind is, the evaluation settings and splits per preset (paper /
cpu / tiny), the paper's table layout, and ``--jobs`` (independent runs in processes). The rest
is the package's public API: ``train_cached`` keeps trained models in ``<cache>/<kind>-<config
fingerprint>`` (a second script finds a finished run at once), ``evaluate_model`` keeps protocol
results in its store ``<cache>/eval-<hash>.jsonl`` (and resumes from it), ``write_tables``
writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from jsonargparse import ArgumentParser, Namespace

from deq_attacks import DEQ, DEQEstimator, GradientEstimate, Phantom, ready_made, training
from deq_attacks.cli import options
from deq_attacks.data import ImageDataset
from deq_attacks.evaluation import (
    BPTT,
    READY_MADE,
    EvaluationConfig,
    EvaluationReport,
    Mode,
    SweepConfig,
    SweepMode,
    evaluate_model,
    held_out_data,
    write_tables,
)
from deq_attacks.evaluation.attacks import AutoAttackSettings, Square, StandardAutoAttack
from deq_attacks.model_spec import ModelSpec
from deq_attacks.records import plain, to_jsonable
from deq_attacks.registry import parse_spec, split_specs
from deq_attacks.training import Device, Gradient, RunResult, TrainConfig, preset

T = TypeVar("T")
PRESETS = ("paper", "cpu", "tiny")
#: Processes for a script's independent runs: the CPU preset's two cores (one thread each:
#: these small models gain nothing from a second thread); one GPU runs one at a time.
DEFAULT_JOBS = {"paper": 1, "cpu": 2, "tiny": 1}
DEFAULT_CACHE = Path("runs/paper_cache")
#: Training preset per model kind for --preset paper (CIFAR-10, DEQ-Large unless named);
#: "clean" is the exact one without adversarial training.
PAPER_KINDS = {
    "exact": "deq_large_exact_8_7", "exact_18_20": "deq_large_exact_18_20",
    "exact_30_30": "deq_large_exact_30_30", "exact_50_50": "deq_large_exact_50_50",
    "unrolling": "deq_large_unrolling", "unrolling_xl": "deq_xl_unrolling",
    "baseline": "resnet18_pgd_at", "baseline_xl": "wrn34_10_pgd_at",
}  # fmt: skip
#: The CPU presets; also "baseline" (a ResNet-18 by the same recipe) and "exact_F_B" (F/B
#: forward/backward iterations).
CPU_KINDS = {"exact": "cpu_exact", "unrolling": "cpu_unrolling", "clean": "cpu_clean"}
CPU_BASELINE: dict[str, Any] = dict(
    model=ModelSpec("resnet18", args={"width": 8}, training_gradient=Gradient.AUTOGRAD),
    pretrain_steps=0, jac_weight=0.0,
)  # fmt: skip
#: --preset tiny: the CPU models, smaller (width 8, baselines 4) and shorter.
TINY_TRAINING: dict[str, Any] = dict(
    train_limit=60, dev_size=20, epochs=1, batch_size=20, pretrain_steps=1, steps=2,
    eval_batch_size=20, spectral_samples=2, plots=False,
)  # fmt: skip
#: GPU hours on one RTX 3090, from the paper's Table 10 throughput (docs/training.md).
PAPER_GPU_HOURS = {"deq_large_unrolling": 46, "deq_large_exact_8_7": 57,
                   "deq_large_exact_18_20": 73, "deq_large_exact_30_30": 216,
                   "deq_large_exact_50_50": 312}  # fmt: skip
#: The protocol's settings per preset: the paper's (standard AutoAttack); on CPU eps 0.1 (the
#: training eps of the digits), the default sweep grid, AutoAttack only where asked (reduced).
EVALUATION: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": dict(eps=0.1, step=0.025, attacks="pgd,square:queries=300", long_steps=50,
                diagnostic_samples=16),
    "tiny": dict(eps=0.1, step=0.025, steps=2, attacks="pgd,square:queries=10", long_steps=3,
                 diagnostic_samples=2, batch_size=20,
                 sweep=SweepConfig({"adjoint": {"n": "1,2", "beta": "1.0"},
                                    "unrolled": {"n": "1,2", "k": "1", "lam": "1.0"}})),
}  # fmt: skip
#: The AutoAttack that ``eval_config(autoattack=True)`` adds, per preset (reduced on CPU).
AUTOATTACK = {
    "paper": "autoattack",
    "cpu": "autoattack:iterations=10,queries=100,target_classes=1",
    "tiny": "autoattack:iterations=2,queries=5,target_classes=1",
}
#: Development / test images per preset (the first held-out images, then the next).
SPLITS = {"paper": (1000, 9000), "cpu": (100, 200), "tiny": (10, 20)}


def parser(description: str) -> ArgumentParser:
    """The options every paper script takes (a script adds its own), with ``--config FILE``;
    ``--train.SECTION.FIELD`` / ``--eval.FIELD`` change that setting for every model /
    evaluation."""
    p = options.new_parser(None, description)
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="paper (GPU) | cpu | tiny")
    p.add_argument("--out_dir", "--out-dir", type=Path | None,
                   help="results (null: runs/paper/<preset>/<script>)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="trained models, shared")
    p.add_argument("--data", default="digits", help="cpu/tiny: digits or an .npz arrays file")
    p.add_argument("--data_root", "--data-root", type=Path, default=Path("data"),
                   help="paper: CIFAR-10 root")
    p.add_argument("--device", choices=["cpu", "cuda"], help="null: the preset's")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--jobs", type=int | None, help="independent runs (protocols, models to "
                   f"train) at once, each in a process (null: {DEFAULT_JOBS})")
    options.add_settings(p, TrainConfig, "train", title="--train.SECTION.FIELD: a setting for "
                         "every model trained (only those given: each replaces the preset's)")
    options.add_settings(p, EvaluationConfig, "eval", skip={"sweep"}, title="--eval.FIELD: a "
                         "setting for every evaluation (only those given: each replaces the "
                         "preset's)")
    return p  # fmt: skip


def parse(p: ArgumentParser, argv: Sequence[str] | None) -> Namespace:
    """The options of ``argv``, ``train`` and ``eval`` holding only the settings given (field ->
    typed value). A bad option or value is a ``SystemExit`` with its message."""
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
    train_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
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


def main_wrapper(run: Callable[[Setup], Any], description: str, name: str) -> Callable[..., int]:
    """A ``main(argv)`` that parses the common options and calls ``run(setup)``."""

    def main(argv: Sequence[str] | None = None) -> int:
        run(Setup.from_args(parse(parser(description), argv), name))
        return 0

    return main


def train_config(setup: Setup, kind: str, **changes: Any) -> TrainConfig:
    """The training config of model ``kind`` for the preset, then the user's ``--train.*``
    settings, then ``changes`` (TrainConfig fields)."""
    if setup.preset == "paper":
        if kind not in PAPER_KINDS and kind != "clean":
            raise ValueError(f"no paper model {kind!r}; kinds: {sorted(PAPER_KINDS)} + clean")
        base = preset(PAPER_KINDS["exact" if kind == "clean" else kind])
        if kind == "clean":
            base = base.updated(adversarial=False)
        base = base.updated(data_root=setup.data_root, device=Device(setup.device))
    else:
        if kind == "baseline":
            base = preset("cpu_exact").updated(**CPU_BASELINE)
        elif kind.startswith("exact_"):
            forward, backward = (int(v) for v in kind.split("_")[1:])
            base = preset("cpu_exact").updated(forward_threshold=forward,
                                               backward_threshold=backward)
        elif kind in CPU_KINDS:
            base = preset(CPU_KINDS[kind])
        else:
            raise ValueError(f"no cpu model {kind!r}; kinds: {sorted(CPU_KINDS)}, baseline")
        base = base.updated(source=setup.data, device=Device(setup.device))
        if setup.preset == "tiny":
            width = {"channels": 8, "dropout": 0.0} if base.is_deq else {"width": 4}
            base = base.updated(args=width, **TINY_TRAINING)
    return base.updated(**{**setup.train_settings, **changes})  # fmt: skip


def train_cached(setup: Setup, kind: str, **changes: Any) -> RunResult:
    """Model ``kind`` trained (or found) in the shared cache, with its best weights."""
    config = train_config(setup, kind, **changes)
    if setup.preset == "paper":
        name = PAPER_KINDS.get(kind, kind)
        print(f"[paper] {name}: expected about {PAPER_GPU_HOURS.get(name, 'several x 50')} "
              "GPU hours on one RTX 3090 (docs/training.md)")  # fmt: skip
    started = time.perf_counter()
    result = training.train_cached(config, setup.cache, kind, lambda t: print(f"  [{kind}] {t}"))
    print(f"  [{kind}] model ready in {time.perf_counter() - started:.0f} s ({result.run_dir})")
    return result


def split(setup: Setup) -> tuple[ImageDataset, ImageDataset]:
    """(development, test): images no training run saw (the CIFAR-10 test set, the digits past
    the training pool, an arrays file's test split or last 20%), the first n_dev, then n_test."""
    data = held_out_data(f"cifar10:{setup.data_root}" if setup.preset == "paper" else setup.data)
    n_dev, n_test = SPLITS[setup.preset]
    n_test = min(n_test, len(data) - n_dev)
    if n_test < 1:
        raise SystemExit(f"{len(data)} held-out images: too few for {n_dev} development ones")
    return data.subset(np.arange(n_dev)), data.subset(np.arange(n_dev, n_dev + n_test))


def estimator(result: RunResult, setup: Setup) -> DEQEstimator:
    """The ART estimator of a trained DEQ (defense and estimate switched by the protocol)."""
    if not isinstance(result.model, DEQ):
        raise TypeError(f"{type(result.model).__name__} is not a DEQ")
    return DEQEstimator(result.model, input_shape=result.image_shape, nb_classes=result.num_classes,
                        device_type="gpu" if setup.device == "cuda" else "cpu")  # fmt: skip


def eval_config(setup: Setup, autoattack: bool | None = None, **changes: Any) -> EvaluationConfig:
    """The preset's protocol settings (table mode and the grid sweep: the paper's tables and
    its Fig. 3/4 need every cell and every candidate), then the user's ``--eval.*``;
    ``autoattack`` adds (True) or drops (False) the standard AutoAttack after the PGD (None: as
    it is); then ``changes``; the attack batch resolved for the device (recorded in the
    results)."""
    paper_tables = {"mode": Mode.TABLE, "sweep_mode": SweepMode.GRID}
    config = EvaluationConfig(**{**paper_tables, **EVALUATION[setup.preset], **setup.eval_settings})
    if autoattack is not None:
        specs = [s for s in split_specs(config.attacks) if parse_spec(s)[0] != "autoattack"]
        if autoattack:
            at = [parse_spec(s)[0] for s in specs].index("pgd") + 1
            specs.insert(at, AUTOATTACK[setup.preset])
        config = dataclasses.replace(config, attacks=",".join(specs))
    config = dataclasses.replace(config, **changes)
    if config.batch_size is None:
        device = torch.device(setup.device)
        config = dataclasses.replace(config, batch_size=config.attack_batch(device))
    return config


def autoattack_settings(config: EvaluationConfig) -> AutoAttackSettings:
    """The budget of the run's standard AutoAttack (``eval_config(autoattack=True)``)."""
    found = [a for a in config.attack_specs if isinstance(a, StandardAutoAttack)]
    if not found:
        raise ValueError(f"no AutoAttack among the attacks {config.attacks!r}")
    return found[0].settings


def square_queries(config: EvaluationConfig) -> int:
    """The queries of the run's Square column."""
    found = [a.queries for a in config.attack_specs if isinstance(a, Square)]
    if not found:
        raise ValueError(f"no Square column among the attacks {config.attacks!r}")
    return found[0]


def protocol_extras(result: RunResult) -> dict[str, GradientEstimate]:
    """Extra columns so both 'final' attacks of the paper's tables exist: the phantom gradient
    (k=5, lambda=0.5) when the model's ready-made attack is the exact gradient."""
    assert isinstance(result.model, DEQ)
    if ready_made(result.model.training_gradient) == Phantom(5, 0.5):
        return {}
    return {"phantom": Phantom(5, 0.5)}


def run_protocol(
    setup: Setup, kind: str, config: EvaluationConfig | None = None, **train_changes: Any
) -> tuple[RunResult, EvaluationReport]:
    """The whole protocol on model ``kind``, its results stored in the cache (a second script
    with the same model and settings reads them back at once)."""
    result = train_cached(setup, kind, **train_changes)
    dev, test = split(setup)
    config = config or eval_config(setup)
    extras = protocol_extras(result)
    key = json.dumps([result.run_dir.name, to_jsonable(config), len(dev), len(test),
                      sorted(extras)])  # fmt: skip
    path = setup.cache / f"eval-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"
    started = time.perf_counter()
    report = evaluate_model(
        estimator(result, setup), (test.x, test.y), (dev.x, dev.y), config,
        store_path=path, extra_estimates=extras,
        description={"kind": kind, "run": str(result.run_dir)},
        progress=lambda text: print(f"  [{kind} eval {time.perf_counter() - started:5.0f} s] "
                                    f"{text}", flush=True),
    )  # fmt: skip
    return result, report


def in_processes(jobs: int, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> Iterator[T]:
    """``fn(*args)`` for each args in ``calls``, in order: here one after another when ``jobs``
    is 1, else in up to ``jobs`` spawned processes (``fn`` must be importable)."""
    if jobs == 1 or len(calls) <= 1:
        yield from (fn(*args) for args in calls)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=context) as pool:
        yield from pool.map(fn, *zip(*calls, strict=True))


def run_protocols(
    setup: Setup, runs: Sequence[tuple[str, EvaluationConfig]]
) -> list[tuple[RunResult, EvaluationReport]]:
    """``run_protocol`` for each (kind, config); with ``setup.jobs`` > 1 first in that many
    processes, each filling the cache (training its model if need be), then read back here."""
    if setup.jobs > 1 and len(runs) > 1:
        list(in_processes(setup.jobs, _protocol_job, [(setup, k, c) for k, c in runs]))
    return [run_protocol(setup, kind, config) for kind, config in runs]


def _protocol_job(setup: Setup, kind: str, config: EvaluationConfig) -> None:
    torch.set_num_threads(setup.threads)
    run_protocol(setup, kind, config)


# --- layout ---------------------------------------------------------------------------------

#: Tables 2, 3 and 6: per defense, clean, then the simultaneous adjoint's final, intermediate
#: and ensemble attacks, then the unrolled intermediates' three.
LAYOUT = ["defense", "clean", "adjoint final", "adjoint intermediate", "adjoint ensemble",
          "unrolled final", "unrolled intermediate", "unrolled ensemble"]  # fmt: skip


def layout_rows(values: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows of ``LAYOUT`` from lists of values (the paper's numbers)."""
    return [dict(zip(LAYOUT, v, strict=True)) for v in values]


def pct(value: float) -> float:
    """A fraction in [0, 1] as a percentage rounded to 2 decimals."""
    return round(100.0 * float(value), 2)


def column_accuracy(report: EvaluationReport) -> dict[str, dict[str, float]]:
    """defense -> 'clean', then each column label -> accuracy (%)."""
    return {d: {"clean": pct(sum(report.clean[d]) / len(report.clean[d])),
                **{c: pct(v) for c, v in row.items()}}
            for d, row in report.column_accuracy().items()}  # fmt: skip


def find_column(columns: Sequence[str], prefix: str, suffix: str = "PGD") -> str:
    """The one column label starting with ``prefix`` and ending with ``suffix``."""
    found = [c for c in columns if c.startswith(prefix) and c.endswith(suffix)]
    if len(found) != 1:
        raise KeyError(f"no single column {prefix}..{suffix} among {list(columns)}")
    return found[0]


def paper_layout(report: EvaluationReport, attack: str = "PGD") -> list[dict[str, Any]]:
    """``LAYOUT`` filled from the protocol's columns of one attack kind (PGD or AA), then two
    columns the paper does not have: backprop through the solver (when run) and the worst of
    every column of this attack kind and Square (the protocol's white-box robustness)."""
    acc = column_accuracy(report)
    labels = list(next(iter(acc.values())))
    exact_trained = "phantom PGD" in labels
    ready, exact = f"{READY_MADE} ", "exact "
    sources = dict(zip(LAYOUT[2:], [ready if exact_trained else exact, "adjoint z_",
                                    "ens. adjoint ", "phantom " if exact_trained else ready,
                                    "unrolled z_", "ens. unrolled "], strict=True))  # fmt: skip
    rows = []
    for defense, cells in acc.items():
        row: dict[str, Any] = {"defense": defense, "clean": cells["clean"]}
        row.update({name: cells[find_column(labels, p, attack)] for name, p in sources.items()})
        if any(c.startswith(BPTT) for c in labels):
            row["bptt (ours)"] = cells[find_column(labels, f"{BPTT} ", attack)]
        row["worst (ours)"] = min(
            v for c, v in cells.items() if c.endswith(f" {attack}") or c == "square"
        )
        rows.append(row)
    return rows


def robustness(report: EvaluationReport) -> dict[str, Any]:
    """Both aggregations of the protocol (best defense), in %."""
    out = report.to_json()["white_box_robustness"]
    return {k: {"defense": v["defense"], "accuracy": pct(v["accuracy"])} for k, v in out.items()}


def diagnostic_notes(title: str, report: EvaluationReport) -> list[str]:
    """One line per diagnostic of the protocol: verdict and sentence."""
    return [f"{title}: {c.name} [{c.verdict}] {c.message}" for c in report.diagnostics]


def scale_note(setup: Setup) -> str:
    """What scale a preset ran at and, for ``cpu`` and ``tiny``, that its numbers are not
    comparable with the paper's table (CIFAR-10, DEQ-Large/XL trained for 150 epochs, eps
    8/255, standard AutoAttack)."""
    if setup.preset == "paper":
        return "preset `paper`: the paper's scale (CIFAR-10, eps 8/255, standard AutoAttack)"
    settings = {**EVALUATION[setup.preset], **setup.eval_settings}
    n_dev, n_test = SPLITS[setup.preset]
    if setup.preset == "tiny":
        training = (f"{TINY_TRAINING['epochs']} epoch on {TINY_TRAINING['train_limit']} images, "
                    "width 8: a smoke test of the script, not a measurement")  # fmt: skip
    else:
        training = f"{preset('cpu_exact').optimiser.epochs} epochs on CPU, small conv DEQs"
    budgets = (
        f"PGD-{settings.get('steps', 10)}, Square "
        f"{square_queries(EvaluationConfig(attacks=settings['attacks']))} queries, "
        f"AutoAttack {'not run' if 'autoattack' not in settings['attacks'] else 'reduced'}"
    )
    return (
        f"NOT COMPARABLE with the paper's table: preset `{setup.preset}` ran at toy scale "
        f"(data {setup.data}, {training}; {n_dev} development / {n_test} test images; L-inf "
        f"eps {settings['eps']:g}; reduced budgets: {budgets}). The paper's numbers below are "
        "CIFAR-10 with DEQ-Large/XL trained for 150 epochs at eps 8/255 under the standard "
        "AutoAttack."
    )


def write_results(
    setup: Setup, title: str, tables: dict[str, list[dict[str, Any]]],
    paper: dict[str, list[dict[str, Any]]], started: float, notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``results.json`` and ``results.md`` in the out dir: the measured tables, then the
    paper's, labelled "paper"; for the ``cpu`` and ``tiny`` presets the scale they ran at and
    that they are not comparable with the paper's, in the intro, every measured table's title
    and the record; the markdown printed, the JSON record returned."""
    wall = time.perf_counter() - started
    data = "cifar10" if setup.preset == "paper" else setup.data
    changed = plain({**setup.train_settings, **setup.eval_settings})
    scale = scale_note(setup)
    comparable = setup.preset == "paper"
    measured = "measured" if comparable else f"measured ({setup.preset} preset, not comparable)"
    record = {
        "title": title, "preset": setup.preset, "data": data, "wall_seconds": round(wall, 1),
        "comparable_with_paper": comparable, "scale": scale,
        "measured": tables, "paper": paper, "notes": list(notes),
        "train_settings": plain(setup.train_settings), "eval_settings": plain(setup.eval_settings),
        **(extra or {}),
    }  # fmt: skip
    text = write_tables(
        setup.out_dir, title,
        {**{f"{measured}: {k}": v for k, v in tables.items()},
         **{f"paper (CIFAR-10, DEQ-Large/XL): {k}": v for k, v in paper.items()}},
        record, intro=[f"preset `{setup.preset}`, data `{data}`, wall time {wall:.0f} s",
                       f"**{scale}**"],
        notes=[*notes, *([f"changed from the preset: {changed}"] if changed else [])],
    )  # fmt: skip
    print(text)
    return record
