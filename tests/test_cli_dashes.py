"""The CLI keeps its word: every multi-word option of every subcommand takes dashes as well as
underscores, both spellings one option."""

from __future__ import annotations

import importlib

import pytest

from deq_attacks.cli import SUBCOMMANDS, main
from deq_attacks.cli.options import new_parser


def parsers():
    """Each subcommand's parser (``list`` builds its one positional on ``new_parser``)."""
    for name, (module, _) in SUBCOMMANDS.items():
        build = getattr(importlib.import_module(module), "build_parser", None)
        yield name, build() if build is not None else new_parser(name, None)


def option_actions(parser):
    return {o: a for a in parser._actions for o in a.option_strings if o.startswith("--")}


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS])
def test_every_multi_word_option_takes_dashes_and_underscores(name: str) -> None:
    parser = dict(parsers())[name]
    options = option_actions(parser)
    multi = [o for o in options if "_" in o[2:]]
    assert "--print_config" in multi
    if name != "list":
        assert len(multi) > 3, f"{name}: {multi}"
    for option in multi:
        dashed = "--" + option[2:].replace("_", "-")
        assert options.get(dashed) is options[option], f"{name}: {option} has no {dashed}"


def test_the_dashed_spelling_reaches_the_setting(capsys) -> None:
    argv = ["--model.name", "mlp_deq", "--long-steps", "30", "--batch-size", "4",
            "--print-config"]  # fmt: skip
    assert main(["evaluate", *argv]) == 0
    printed = capsys.readouterr().out
    assert "long_steps: 30" in printed and "batch_size: 4" in printed
    assert (
        main(
            [
                "train",
                "--preset",
                "cpu_unrolling",
                "--data.dev-size",
                "50",
                "--data.train-limit",
                "200",
                "--print-config",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "dev_size: 50" in printed and "train_limit: 200" in printed
