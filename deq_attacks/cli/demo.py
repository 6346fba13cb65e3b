"""``deq-attacks``: train a DEQ and evaluate it white-box, ending with the result table.

    deq-attacks                                   # the demo preset, a few minutes on 2 cores
    deq-attacks demo --eps 0.2 --train.optimiser.epochs 4 --eval.attacks pgd,square:queries=50
    deq-attacks demo --print_config > demo.yaml   # every setting, as a file for --config

The default runs in a few minutes on 2 CPU cores on scikit-learn's embedded digits (real 8x8
handwritten digits; no download): the ``demo`` training preset (clean pretraining of the
unrolled network, then PGD-AT of a small conv DEQ with the unrolling (phantom) gradient, the
best epoch by development PGD accuracy) through ``run_training``, then the whole evaluation
protocol at a small scale with the ``digits`` evaluation preset and the demo's sweep (early
exit and intermediate-attack sweep on a development split, PGD-10 and AutoAttack with every
gradient estimate, Square, per-sample worst case, diagnostics) against the final, early-exit
and ensemble defenses.

``--train.SECTION.FIELD`` and ``--eval.FIELD`` set any setting of the training (``TrainConfig``,
e.g. ``--train.optimiser.epochs``, ``--train.model.args.channels``) and of the evaluation
(``EvaluationConfig``); ``--preset`` chooses the training preset their defaults
come from (``deq-attacks list presets``). ``--eps``, ``--step``, ``--steps`` and ``--seed`` set
both (the nested form wins where both are given); ``--data``, ``--device`` and ``--threads``
set the training's.

Training draws only on the training pool of the data (the first 1,200 digits, or an arrays
file's ``x_train`` / first 80%); the evaluation's development and test images come from the
rest (``--n_dev`` then ``--n_test`` of them), so they never overlap what was trained on.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from deq_attacks.cli.evaluate import add_sweep_option, sweep_config
from deq_attacks.cli.options import (
    CommandError,
    add_settings,
    fail,
    new_parser,
    parse,
    print_settings,
    refuse_renamed,
    set_settings_defaults,
    settings,
)
from deq_attacks.cli.train import renamed_options
from deq_attacks.evaluation.presets import evaluation_preset
from deq_attacks.evaluation.settings import EvaluationConfig, Mode, SweepConfig, SweepMode
from deq_attacks.training.config import Device, TrainConfig
from deq_attacks.training.presets import preset

#: The demo's sweep: every n with beta in {0.5, 1} (Adjoint) and k in {1, 5}, lambda 1 (Unrolled).
DEMO_SWEEP = SweepConfig({"unrolled": {"k": "1,5", "lam": "1.0"}})
#: The training preset of the demo unless ``--preset`` names another.
DEFAULT_PRESET = "demo"
#: Options that set both the training's and the evaluation's setting of the same name.
SHARED = ("eps", "step", "steps", "seed")
#: Options that set the training's setting of the same name.
TRAINING_ONLY = ("data", "device", "threads")


def evaluation_defaults() -> EvaluationConfig:
    """The demo's evaluation before the user's options: the ``digits`` preset (the threat model
    of the digits, a reduced AutoAttack, Square with 100 queries, PGD-50 for the more-steps
    check) with the demo's sweep."""
    return evaluation_preset("digits").apply(
        # the full table and the grid sweep the README's table was measured with
        EvaluationConfig(sweep=DEMO_SWEEP, mode=Mode.TABLE, sweep_mode=SweepMode.GRID)
    )


def build_parser() -> ArgumentParser:
    parser = new_parser("deq-attacks demo", __doc__.splitlines()[0], __doc__)
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="training preset (deq-attacks list presets); its values are the --train.* defaults",
    )
    shortcuts = parser.add_argument_group("shortcuts (null: the preset's)")
    shortcuts.add_argument(
        "--eps", type=float | None, help="L-inf budget of PGD-AT and the evaluation"
    )
    shortcuts.add_argument("--step", type=float | None, help="PGD step size (both)")
    shortcuts.add_argument("--steps", type=int | None, help="PGD iterations (both)")
    shortcuts.add_argument("--seed", type=int | None, help="seed of training and evaluation")
    shortcuts.add_argument(
        "--data",
        type=str | None,
        help="training data: 'digits' (embedded) or an arrays file (.npz) such as "
        "../shared/data/mnist_t10k.npz or cifar10_subset.npz; the evaluation uses its rest",
    )
    shortcuts.add_argument("--device", choices=["cpu", "cuda"], help="device of both")
    shortcuts.add_argument(
        "--threads",
        type=int | None,
        help="CPU threads for torch (the default small model is fastest on one)",
    )
    parser.add_argument("--n_test", "--n-test", type=int, default=100, help="test images attacked")
    parser.add_argument(
        "--n_dev", "--n-dev", type=int, default=100, help="development images (early exit, sweep)"
    )
    parser.add_argument(
        "--out_dir",
        "--out-dir",
        type=Path,
        default=Path("runs/demo"),
        help="results and plots; the training run in OUT_DIR/training (a rerun resumes both)",
    )
    parser.add_argument(
        "--native_kernels",
        "--native-kernels",
        type=bool,
        default=False,
        help="run torch's CPU kernels for this CPU (AVX-512 where it has it) instead of the "
        "AVX2 ones the demo pins so that its table is the same on every x86-64 CPU "
        "(deq_attacks.reproducibility): faster on some CPUs, but the numbers depend on the CPU",
    )
    add_settings(parser, TrainConfig, "train",
                 title="--train.SECTION.FIELD: the training (TrainConfig)")  # fmt: skip
    add_settings(parser, EvaluationConfig, "eval", skip={"sweep"},
                 title="--eval.FIELD: the evaluation (EvaluationConfig)")  # fmt: skip
    add_sweep_option(parser)
    set_defaults(parser, DEFAULT_PRESET, {})
    return parser


def set_defaults(parser: ArgumentParser, name: str, shortcuts: dict[str, Any]) -> None:
    """The ``--train.*`` defaults from the preset ``name``, the ``--eval.*`` ones from
    ``evaluation_defaults``, both with the shortcuts given (name -> value) applied."""
    try:
        training = preset(name)
    except ValueError as error:
        raise CommandError(str(error)) from None
    evaluation = evaluation_defaults()
    shared = {k: v for k, v in shortcuts.items() if k in SHARED}
    fields = {("source" if k == "data" else k): v for k, v in shortcuts.items()}
    if "device" in fields:
        fields["device"] = Device(fields["device"])
    try:
        training = training.updated(**fields)
        evaluation = dataclasses.replace(evaluation, **shared)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    set_settings_defaults(parser, training, "train")
    set_settings_defaults(parser, evaluation, "eval", skip={"sweep"})


def resolve(
    argv: Sequence[str],
) -> tuple[ArgumentParser, Namespace, TrainConfig, EvaluationConfig]:
    """Parse and validate: the preset and the shortcuts as defaults, then config files, then
    the nested options."""
    refuse_renamed(argv, renamed_options("--train."))
    parser = build_parser()
    args = parse(parser, list(argv))
    given = {k: args[k] for k in (*SHARED, *TRAINING_ONLY) if args[k] is not None}
    set_defaults(parser, args.preset, given)
    args = parse(parser, list(argv))
    training = settings(TrainConfig, args.train)
    evaluation = settings(EvaluationConfig, args.eval, sweep=sweep_config(args.sweep, DEMO_SWEEP))
    return parser, args, training, evaluation


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser, args, training, evaluation = resolve(sys.argv[1:] if argv is None else argv)
    except CommandError as error:
        return fail("demo", error)
    if args.print_config:
        print_settings(parser, args)
        return 0
    from deq_attacks.reproducibility import pin_cpu_kernels

    try:
        kernels = None if args.native_kernels else pin_cpu_kernels()
    except RuntimeError as error:
        return fail("demo", error)
    from deq_attacks.cli.jobs import demo

    return demo(args, training, evaluation, kernels)


if __name__ == "__main__":
    raise SystemExit(main())
