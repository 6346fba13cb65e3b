"""How deep a ready-made PGD column sits: from ``deq-attacks evaluate`` (its ``main``) to the
gradient estimate at most 8 hops of package code (the command, its job, ``evaluate_model``, the
column runner, the attack, the torch PGD of the attack layer, the defended model's loss
gradient, ``input_gradient``, then the estimate); a column builds its one white-box view once,
not once per block, and a torch column builds no ART classifier at all: the protocol runs on
the neutral module."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from evaluation_fixtures import SQUARE, TINY, splits, tiny_estimator
from torch import Tensor

import deq_attacks
from deq_attacks import Final, Phantom, Unrolled
from deq_attacks.evaluation import SweepConfig, column_scores, evaluate_model, protocol_columns
from deq_attacks.gradients import BackwardPass, register_estimate, scoped_registry
from deq_attacks.interfaces import DEQEstimator, WhiteBoxModule

PACKAGE = str(Path(deq_attacks.__file__).resolve().parent)
LIMIT = 8
LINES = ["--model.name", "small_conv_deq", "--model.args.in_channels", "1",
         "--model.args.image_size", "8", "--model.forward_threshold", "3",
         "--model.training-gradient", "phantom", "--n-dev", "4", "--n-test", "4",
         "--attacks", "pgd", "--bptt", "false", "--steps", "1", "--long_steps", "2",
         "--diagnostic_samples", "2", "--sweep", "adjoint.n=1", "--sweep", "adjoint.beta=1.0",
         "--sweep", "unrolled.n=1", "--sweep", "unrolled.k=1", "--sweep", "unrolled.lam=1.0",
         "--mode", "table"]  # fmt: skip
CONFIG = dataclasses.replace(
    TINY, attacks="pgd", bptt=False, sweep=SweepConfig({"unrolled": {"n": "1", "k": "1"}})
)

#: The package frames from ``evaluate_model`` down, at each call of the spy's gradient.
SEEN: list[list[str]] = []


@dataclass(frozen=True)
class Spy(Unrolled):
    """``Unrolled`` that records the package frames above each of its gradient calls."""

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        frames = [f for f in inspect.stack() if f.filename.startswith(PACKAGE)]
        top = next(i for i, f in enumerate(frames) if f.function == "evaluate_model")
        SEEN.append([f"{Path(f.filename).name}:{f.function}" for f in frames[: top + 1]])
        return super().injection_gradient(backward)


@pytest.fixture
def spy() -> Iterator[Spy]:
    with scoped_registry():
        register_estimate("frame_spy")(Spy)
        yield Spy(n=1, k=1, lam=1.0)


def test_a_pgd_column_is_at_most_8_frames_under_evaluate_model(spy: Spy) -> None:
    SEEN.clear()
    dev, test = splits()
    estimator = tiny_estimator(trained=True)
    report = evaluate_model(estimator, test, dev, CONFIG, extra_estimates={"spy": spy})
    # the column's attack (the cost estimate and the measurements call the spy too)
    column = [frames for frames in SEEN if "context.py:run_column" in frames]
    assert "spy PGD" in report.columns and column
    deepest = max(column, key=len)
    assert len(deepest) <= LIMIT, "\n".join(reversed(deepest))
    assert deepest[-1] == "protocol.py:evaluate_model" and "pgd.py:pgd" in deepest


def test_from_the_evaluate_command_a_pgd_column_is_at_most_8_hops_from_its_estimate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ready-made estimate of a phantom-trained DEQ is ``Phantom``: the package frames
    above each of its gradients in the ready-made PGD column, counted from the ``evaluate``
    subcommand's ``main``: each frame is one hop, the last one (``input_gradient``) into the
    estimate."""
    from deq_attacks.cli import main

    seen: list[list[str]] = []
    original = Phantom.injection_gradient

    def spy(self: Phantom, backward: BackwardPass) -> Tensor:
        frames = [f for f in inspect.stack() if f.filename.startswith(PACKAGE)]
        seen.append([f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.function}"
                     for f in frames])  # fmt: skip
        return original(self, backward)

    monkeypatch.setattr(Phantom, "injection_gradient", spy)
    assert main(["evaluate", *LINES, "--out-dir", str(tmp_path / "out")]) == 0
    column = [frames for frames in seen if "evaluation/context.py:run_column" in frames]
    assert column, "the ready-made PGD column made no gradient call"
    deepest = max(column, key=len)
    top = deepest.index("cli/evaluate.py:main")
    hops = deepest[: top + 1]  # from input_gradient up to the subcommand's main
    assert len(hops) <= LIMIT, "\n".join(reversed(hops))
    assert hops[0] == "gradients/base.py:input_gradient"
    assert "cli/jobs.py:evaluate" in hops and "adversarial/pgd.py:pgd" in hops


def _constructions(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"modules": 0, "classifiers": 0}
    module_init, classifier_init = WhiteBoxModule.__init__, DEQEstimator.__init__

    def count_module(self, *args, **kwargs) -> None:
        counts["modules"] += 1
        module_init(self, *args, **kwargs)

    def count_classifier(self, *args, **kwargs) -> None:
        counts["classifiers"] += 1
        classifier_init(self, *args, **kwargs)

    monkeypatch.setattr(WhiteBoxModule, "__init__", count_module)
    monkeypatch.setattr(DEQEstimator, "__init__", count_classifier)
    return counts


@pytest.mark.parametrize("attack", ["pgd", "square"])
def test_a_column_builds_its_views_once_not_per_block(
    attack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits()
    config = dataclasses.replace(CONFIG, attacks=f"pgd,{SQUARE}")
    columns = protocol_columns({"unrolled": Unrolled(n=1)}, config)
    column = next(c for c in columns if c.attack.name == attack)
    built = {}
    for batch in (len(x), 4):  # one block, then several
        counts = _constructions(monkeypatch)
        blocks = dataclasses.replace(config, batch_size=batch)
        scores = column_scores(estimator, x, y, blocks, column, {"final": Final()})
        assert len(scores.correct["final"]) == len(x)
        built[batch] = dict(counts)
    assert len(x) // 4 >= 2
    assert built[4] == built[len(x)]  # per column, whatever the number of blocks
    assert built[4] == {"modules": 1, "classifiers": 0}  # the column's one view, no ART
