"""``deq-attacks train``: adversarial training from a named preset (Table 7 and CPU presets).

    deq-attacks train --preset cpu_unrolling --out-dir runs/cpu_unrolling
    deq-attacks train --preset deq_large_exact_8_7 --data-root data --download true
    torchrun --nproc_per_node=4 -m deq_attacks train --preset deq_xl_unrolling

Settings: the preset, then a JSON config file (``--config``), then ``--set key=value``, then
single options (``--lr 5e-4``); every setting is validated before any work starts. The run
folder gets ``config.json``; a rerun with the same settings resumes after the last epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from deq_attacks.config import add_dataclass_options, dataclass_from_options, override, parse_pairs
from deq_attacks.training import PRESETS, TrainConfig, preset, run_training
from deq_attacks.training.config import Device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deq-attacks train",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(PRESETS),
    )
    parser.add_argument("--preset", help="a named preset (--list-presets shows them)")
    parser.add_argument(
        "--config", type=Path, help="a JSON file of settings (e.g. a run's config.json)"
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable)",
    )
    parser.add_argument("--out-dir", type=Path, help="run folder (default runs/<preset>)")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved settings and exit"
    )
    add_dataclass_options(parser, TrainConfig)
    return parser


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The preset, then the config file, then ``--set``, then single options."""
    config = preset(args.preset) if args.preset else TrainConfig()
    if args.config is not None:
        if not args.config.is_file():
            raise ValueError(f"--config {args.config}: no such file")
        try:
            values = json.loads(args.config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"--config {args.config}: not a JSON file ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of settings")
        config = override(config, {k: _as_text(v) for k, v in values.items()})
    config = override(config, parse_pairs(args.settings))
    return dataclass_from_options(TrainConfig, args, base=config)


def _as_text(value: object) -> str:
    return "none" if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, config in PRESETS.items():
            print(f"{name:<24} {config.model}, {config.gradient.value}, data {config.data}")
        return 0
    if not args.preset and args.config is None:
        parser.error("give --preset NAME (or --config FILE); --list-presets shows the presets")
    try:
        config = resolve(args)
    except ValueError as error:
        print(f"deq-attacks train: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        from deq_attacks.config import to_jsonable

        print(json.dumps(to_jsonable(config), indent=2))
        return 0
    if config.device is Device.CUDA and not torch.cuda.is_available():
        print(
            "deq-attacks train: device=cuda, but torch sees no CUDA device "
            "(the paper presets are for GPUs; --device cpu runs them on the CPU)",
            file=sys.stderr,
        )
        return 2
    out_dir = args.out_dir or Path("runs") / (args.preset or args.config.stem)
    try:
        result = run_training(config, out_dir)
    except (FileNotFoundError, ValueError) as error:  # a resume mismatch is a ValueError
        print(f"deq-attacks train: {error}", file=sys.stderr)
        return 2
    state = result.state
    if state.best_epoch is not None:
        print(
            f"best epoch {state.best_epoch} (dev PGD accuracy {state.best_dev_pgd_accuracy:.1%}): "
            f"{result.run_dir / 'best.safetensors'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
