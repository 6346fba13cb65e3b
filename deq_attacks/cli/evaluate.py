"""``deq-attacks evaluate``: the whole white-box protocol on a trained DEQ.

    deq-attacks evaluate --model small_conv_deq --model_arg in_channels=1 \\
        --model_arg image_size=8 --threshold 8 --training_gradient phantom \\
        --checkpoint runs/demo/training/best.safetensors --data digits --preset digits

    deq-attacks evaluate --model mymodels:build --checkpoint model.pt --data mnist_t10k.npz \\
        --preset mnist --dev_range 8000:8100 --test_range 8100:9100 --eps 0.2

    deq-attacks evaluate --config my_evaluation.yaml --steps 20   # a file, then an option

The model is a registered name or a user's ``package.module:function`` (imported from the
working directory) returning a DEQ; see docs/own_deq.md for the builder contract. The data is
``digits`` (embedded), an arrays file (``.npz``) or ``cifar10:ROOT`` (torchvision's test set).
The development split (early exit, sweep) and the test split are ranges or index files into
that data, or by default the first ``--n_dev`` and next ``--n_test`` images of the part that
training does not use (the digits past 1,200, a file's test split, or the last 20% of a file
without one); the split used is printed and recorded in the results. ``--preset`` sets the
threat model and budgets of a data set (``deq-attacks list presets``); a config file or an
option overrides it. Every multi-word option is also spelled with dashes (``--model-arg``,
``--aa-iterations``). Under
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
    settings,
)
from deq_attacks.evaluation.settings import EvaluationConfig, SweepConfig


def add_model_options(parser: ArgumentParser) -> None:
    """``--model``, ``--model_arg``, ``--solver``, ``--threshold``, ``--training_gradient``,
    ``--backward_solver``, ``--checkpoint`` and ``--key_map`` (how each reaches the model:
    ``model_options``)."""
    group = parser.add_argument_group("model (how each option reaches it: docs/own_deq.md)")
    group.add_argument(
        "--model",
        required=True,
        help="a registered name (deq-attacks list models) or your builder, "
        "package.module:function (imported from the working directory and called, as "
        "Hydra's _target_: a config file naming one is trusted like a script); it returns "
        "a deq_attacks DEQ (DEQModel)",
    )
    group.add_argument(
        "--model_arg",
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword for the builder (Python literal or string); repeatable",
    )
    group.add_argument(
        "--solver",
        type=str | None,
        metavar="NAME[:KEY=VALUE,...]",
        help="replace the model's forward solver, e.g. anderson:threshold=8,memory=5 "
        "(deq-attacks list solvers)",
    )
    group.add_argument(
        "--threshold",
        type=int | None,
        help="forward iterates of the model's own solver (or of --solver); the solver kind is kept",
    )
    group.add_argument(
        "--training_gradient",
        "--training-gradient",
        choices=["phantom", "exact"],
        help="the model's training gradient: phantom (k=5, lam=0.5) or exact (implicit, a "
        "backward solve of threshold - 1 iterates by --backward_solver); it fixes the "
        "ready-made attack",
    )
    group.add_argument(
        "--backward_solver",
        "--backward-solver",
        type=str | None,
        metavar="NAME[:KEY=VALUE,...]",
        help="the backward solver of --training_gradient exact (null: broyden), e.g. "
        "anderson:memory=5; its threshold and tol come from --training_gradient",
    )
    group.add_argument(
        "--checkpoint",
        type=Path | None,
        help="weights: .safetensors or a torch.save state dict (.pt/.pth/.bin/.pth.tar; read "
        "with weights_only=True, containers such as 'state_dict' opened)",
    )
    group.add_argument(
        "--key_map",
        "--key-map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename checkpoint key prefixes before loading (e.g. encoder.=injection.); "
        "repeatable, applied in order",
    )


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
    add_model_options(parser)
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
