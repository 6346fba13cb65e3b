"""``deq-attacks train``: adversarial training from a named preset (Table 7 and CPU presets).

    deq-attacks train --preset cpu_unrolling --out_dir runs/cpu_unrolling
    deq-attacks train --preset deq_large_exact_8_7 --data.data_root data --data.download true
    deq-attacks train --config runs/cpu_unrolling/config.json --optimiser.epochs 20
    torchrun --nproc_per_node=4 -m deq_attacks train --preset deq_xl_unrolling

Settings: the preset's values as defaults (``deq-attacks list presets``), then config files
(``--config``: YAML or JSON, e.g. a run's ``config.json``), then single options, one per
field of a ``TrainConfig`` section: ``--model.*`` (the ``ModelSpec``, as ``deq-attacks
evaluate`` takes it), ``--threat.*``, ``--data.*``, ``--optimiser.*`` and ``--execution.*``
(``--optimiser.lr 5e-4``); every setting is validated before any work starts
(``--print_config`` prints them and exits). The run folder gets ``config.json``; a rerun with
the same settings resumes after the last epoch.
"""

from __future__ import annotations

import dataclasses
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
    set_settings_defaults,
    settings,
)
from deq_attacks.training.config import SECTIONS, TrainConfig


def renamed_options(prefix: str = "--") -> dict[str, str]:
    """The flat options of ``TrainConfig`` before its sections, and their names now
    (``--epochs`` -> ``--optimiser.epochs``; ``prefix`` ``--train.`` for the demo's)."""
    renamed = {
        f"{prefix}{f.name}": f"{prefix}{section}.{f.name}"
        for section, cls in SECTIONS.items()
        if section != "model"
        for f in dataclasses.fields(cls)
    }
    for old, new in (("model", "name"), ("gradient", "training_gradient"),
                     ("width", "args.channels (small_conv_deq; resnet18: args.width, wrn34_10: "
                      "args.widen)"), ("dropout", "args.dropout")):  # fmt: skip
        renamed[f"{prefix}{old}"] = f"{prefix}model.{new}"
    for name in ("forward_solver", "backward_solver", "forward_threshold", "backward_threshold",
                 "solver_tol", "phantom_k", "phantom_lam"):  # fmt: skip
        renamed[f"{prefix}{name}"] = f"{prefix}model.{name}"
    renamed[f"{prefix}data"] = f"{prefix}data.source"
    return renamed


def build_parser() -> ArgumentParser:
    parser = new_parser("deq-attacks train", __doc__.splitlines()[0], __doc__)
    parser.add_argument(
        "--preset",
        type=str | None,
        help="a named preset (deq-attacks list presets); its values replace the defaults "
        "shown here (those of TrainConfig: the paper's exact-trained DEQ-Large)",
    )
    parser.add_argument(
        "--out_dir", "--out-dir", type=Path | None, help="run folder (null: runs/<preset>)"
    )
    add_settings(parser, TrainConfig)
    return parser


def resolve(argv: Sequence[str]) -> tuple[ArgumentParser, Namespace, TrainConfig]:
    """Parse and validate: the preset as defaults, then config files, then options."""
    refuse_renamed(argv, renamed_options())
    parser = build_parser()
    args = parse(parser, list(argv))
    if args.preset is None and not args.config:
        raise CommandError(
            "give --preset NAME (or --config FILE); deq-attacks list presets shows the presets"
        )
    if args.preset is not None:
        from deq_attacks.training.presets import preset

        try:
            set_settings_defaults(parser, preset(args.preset))
        except ValueError as error:
            raise CommandError(str(error)) from None
        args = parse(parser, list(argv))
    return parser, args, settings(TrainConfig, args)


def run_folder(args: Namespace) -> Path:
    """``--out_dir``, or ``runs/<preset>`` (``runs/<name of the last config file>``)."""
    if args.out_dir is not None:
        return Path(args.out_dir)
    name = args.preset if args.preset is not None else Path(str(args.config[-1])).stem
    return Path("runs") / name


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser, args, config = resolve(sys.argv[1:] if argv is None else argv)
    except CommandError as error:
        return fail("train", error)
    if args.print_config:
        print_settings(parser, args)
        return 0
    from deq_attacks.cli.jobs import train

    return train(config, run_folder(args))


if __name__ == "__main__":
    raise SystemExit(main())
