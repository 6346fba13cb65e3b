"""``deq-attacks evaluate``: the whole white-box protocol on a trained DEQ.

    deq-attacks evaluate --model.name small_conv_deq --model.forward_threshold 8 \\
        --model.training_gradient phantom --model.checkpoint runs/demo/training/best.safetensors \\
        --data digits --preset digits

    deq-attacks evaluate --model.name mymodels:build --model.checkpoint model.pt \\
        --data mnist_t10k.npz --preset mnist --dev_range 8000:8100 --test_range 8100:9100 --eps 0.2

    deq-attacks evaluate --config my_evaluation.yaml --steps 20   # a file, then an option

The model is a ``ModelSpec`` (``--model.name``, ``--model.args.KEY VALUE``, the solvers and
thresholds, ``--model.checkpoint``), spelled as ``deq-attacks train`` spells it: a registered
name or a user's ``package.module:function`` (imported from the working directory) returning a
DEQ, its ``num_classes``, ``in_channels`` and ``image_size`` the data's unless given; see
docs/own_deq.md for the builder contract. The data is
``digits`` (embedded), an arrays file (``.npz``) or ``cifar10:ROOT`` (torchvision's test set).
The development split (early exit, sweep) and the test split are ranges or index files into
that data, or by default the first ``--n_dev`` and next ``--n_test`` images of the part that
training does not use (the digits past 1,200, a file's test split, or the last 20% of a file
without one); the split used is printed and recorded in the results. ``--preset`` sets the
threat model and budgets of a data set (``deq-attacks list presets``); a config file or an
option overrides it. Every multi-word option is also spelled with dashes
(``--model.forward-threshold``, ``--aa-iterations``). Under
``torchrun --nproc_per_node=K`` the test samples are sharded across the processes (gloo on
CPU, NCCL on CUDA) and the results gathered.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from deq_attacks.cli.options import (
    CommandError,
    add_settings,
    fail,
    new_parser,
    parse,
    print_settings,
    refuse_renamed,
    settings,
)
from deq_attacks.evaluation.settings import EvaluationConfig, SweepConfig
from deq_attacks.model_spec import ModelSpec

#: evaluate's model options before the model spec, and their names now.
RENAMED = {
    "--model": "--model.name",
    "--model_arg": "--model.args.KEY VALUE",
    "--solver": "--model.forward_solver",
    "--threshold": "--model.forward_threshold",
    "--training_gradient": "--model.training_gradient",
    "--backward_solver": "--model.backward_solver",
    "--checkpoint": "--model.checkpoint",
    "--key_map": "--model.key_map+",
}


def add_split_options(parser: ArgumentParser) -> None:
    """``--data`` and the development and test splits (counts, ranges or index files)."""
    group = parser.add_argument_group("data and splits")
    group.add_argument("--data", default="digits", help="digits | FILE.npz | cifar10:ROOT")
    group.add_argument(
        "--n_dev", "--n-dev", type=int | None, help="development images (null: 100 held-out)"
    )
    group.add_argument(
        "--n_test", "--n-test", type=int | None, help="test images (null: the next 100 held-out)"
    )
    for split in ("dev", "test"):
        group.add_argument(
            f"--{split}_range",
            f"--{split}-range",
            type=str | None,
            metavar="START:STOP",
            help=f"the {split} images START..STOP-1 of the data (e.g. 9800:10000)",
        )
        group.add_argument(
            f"--{split}_indices",
            f"--{split}-indices",
            type=Path | None,
            metavar="FILE",
            help=f"the {split} images listed in FILE (.npy, or text with one index per line)",
        )


def add_sweep_option(parser: ArgumentParser) -> None:
    """The repeatable ``--sweep FAMILY.PARAM=VALUES`` (``SweepConfig.from_items``)."""
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="FAMILY.PARAM=VALUES",
        help="override one grid of the intermediate-attack sweep (repeatable), e.g. "
        "unrolled.k=1,5; the families and their default grids: deq-attacks list sweeps",
    )


def build_parser() -> ArgumentParser:
    parser = new_parser("deq-attacks evaluate", __doc__.splitlines()[0], __doc__)
    add_settings(parser, ModelSpec, "model",
                 title="--model.FIELD: the model (ModelSpec; how each reaches it: "
                 "docs/own_deq.md)")  # fmt: skip
    add_split_options(parser)
    parser.add_argument(
        "--preset",
        type=str | None,
        help="threat model and budgets of a data set (cifar10_paper, cifar10_l2, mnist, digits: "
        "deq-attacks list presets); its values replace the defaults shown here",
    )
    parser.add_argument("--out_dir", "--out-dir", type=Path, default=Path("runs/evaluate"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int | None, help="torch CPU threads (null: torch's)")
    parser.add_argument(
        "--dry_run",
        "--dry-run",
        type=bool,
        default=False,
        help="print the expected f evaluations and wall time of each step and exit",
    )
    add_settings(parser, EvaluationConfig, skip={"sweep"})
    add_sweep_option(parser)
    return parser


def sweep_config(items: Sequence[str], base: SweepConfig | None = None) -> SweepConfig:
    """``base`` (default: the families' own grids) with the ``--sweep`` items applied."""
    try:
        given = SweepConfig.from_items(items)
        return given if base is None else base.updated(given.grids)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None


def resolve(argv: Sequence[str]) -> tuple[ArgumentParser, Namespace, EvaluationConfig]:
    """Parse and validate: the preset (if any) as defaults, then config files, then options."""
    refuse_renamed(argv, RENAMED)
    parser = build_parser()
    args = parse(parser, list(argv))
    if args.preset is not None:
        from deq_attacks.evaluation.presets import evaluation_preset

        try:
            preset = evaluation_preset(args.preset)
        except ValueError as error:
            raise CommandError(str(error)) from None
        parser.set_defaults(dict(preset.settings))
        args = parse(parser, list(argv))
    config = settings(EvaluationConfig, args, sweep=sweep_config(args.sweep))
    return parser, args, config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser, args, config = resolve(sys.argv[1:] if argv is None else argv)
    except CommandError as error:
        return fail("evaluate", error)
    if args.print_config:
        print_settings(parser, args)
        return 0
    from deq_attacks.cli.jobs import evaluate  # torch from here on

    return evaluate(args, config)


if __name__ == "__main__":
    raise SystemExit(main())
