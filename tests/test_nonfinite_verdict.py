"""Non-finite logits are never correct: a DEQ whose logits turn NaN away from the clean input is
0% robust under every column, in both modes and both aggregations, and the diagnostics flag it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from evaluation_fixtures import TINY, splits, tiny_estimator
from torch import Tensor, nn

from deq_attacks.adversarial.defended import NonFiniteAsWrong
from deq_attacks.deq.readout import Final
from deq_attacks.evaluation import Mode, evaluate_model, markdown_report, score_readouts
from deq_attacks.evaluation.attacks import DefendedModel
from deq_attacks.evaluation.scoring import correct


class NaNOffGrid(nn.Module):
    """The injection, plus NaN for a sample not on the digits' grid of k/16 (any perturbation
    of a clean digit): its logits are finite on the clean inputs only."""

    def __init__(self, injection: nn.Module) -> None:
        super().__init__()
        self.inner = injection

    def forward(self, x: Tensor) -> Tensor:
        off = (x * 16 - torch.round(x * 16)).abs().flatten(1).amax(1) > 1e-4
        nan = torch.where(off, torch.tensor(float("nan")), torch.tensor(0.0))
        return self.inner(x) + nan[:, None]


def nan_away_estimator():
    estimator = tiny_estimator(trained=True)
    estimator.deq.injection = NaNOffGrid(estimator.deq.injection)
    return estimator


def test_correct_refuses_nan_and_inf_logits() -> None:
    logits = torch.tensor([[float("nan")] * 3, [1.0, float("inf"), 0.0], [3.0, 1.0, 0.0]])
    # argmax of the NaN row is 0 and of the inf row is 1: both would count as correct
    assert correct(logits, torch.tensor([0, 1, 0])).tolist() == [False, False, True]


def test_scoring_counts_nan_logits_as_wrong_for_defenses_and_states() -> None:
    estimator = nan_away_estimator()
    (x, y), _ = splits()
    clean = score_readouts(estimator, x, y, {"final": Final()}, 8)
    assert clean.finite["final"].all() and clean.accuracy("final") > 0.5
    scores = score_readouts(estimator, np.clip(x + 0.01, 0, 1), y, {"final": Final()}, 8)
    assert not scores.finite["final"].any()
    assert not scores.correct["final"].any() and not np.asarray(scores.states).any()
    assert (y == 0).any()  # class-0 samples exist: argmax alone would call them correct


def test_defended_model_answers_an_empty_batch() -> None:
    model = DefendedModel.of(tiny_estimator())
    x = torch.zeros(0, 1, 8, 8, requires_grad=True)
    out = model(x)
    assert out.shape == (0, 10)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("mode", [Mode.TABLE, Mode.CASCADE, Mode.VERDICT])
def test_a_deq_nan_away_from_the_input_is_never_robust(mode: Mode) -> None:
    dev, test = splits(8, 8)
    config = dataclasses.replace(TINY, mode=mode, bptt=False, diagnostic_samples=2)
    report = evaluate_model(nan_away_estimator(), test, dev, config)
    assert sum(report.clean["final"]) >= 4  # clean-correct samples, finite clean logits
    assert all(r.accuracy == 0 for r in report.robustness())
    assert not any(v.any() for v in report.verdict().values())
    if mode is Mode.TABLE:
        matrix = report.matrix()
        assert matrix.per_sample_robustness().accuracy == 0
        assert matrix.paper_robustness().accuracy == 0
        for row in report.column_accuracy().values():
            assert set(row) >= {"ready-made PGD", "exact AA", "square"}
            assert all(v == 0 for v in row.values()), row
    checks = {c.name: c for c in report.diagnostics}
    assert checks["nonfinite_logits"].verdict == "flag"
    assert checks["nonfinite_logits"].numbers["final"]["ready-made PGD"] > 0
    assert checks["nonfinite_logits"].numbers["final"]["clean"] == 0
    assert checks["zero_or_nan_gradients"].verdict == "flag"
    assert all(v["not_finite_near"] for v in checks["zero_or_nan_gradients"].numbers.values())


def test_the_early_exit_tie_goes_to_the_best_clean_state_and_is_recorded() -> None:
    # every iterate is broken (NaN) under the ready-made PGD: all tie at 0%
    dev, test = splits(8, 8)
    config = dataclasses.replace(TINY, attacks="pgd", bptt=False, diagnostic_samples=2)
    report = evaluate_model(nan_away_estimator(), test, dev, config)
    development = report.development
    clean = np.asarray(development["clean_accuracy_per_state"])
    assert development["early_exit_tied"] == [1, 2, 3, 4]
    best = [n for n in (1, 2, 3, 4) if clean[n - 1] == clean.max()]
    assert report.early_exit == best[-1]  # the best clean accuracy, then the latest
    assert development["early_exit_clean_gap"] == pytest.approx(clean[-1] - clean[best[-1] - 1])
    assert "4 iterates tie at 0.0% (z_1, z_2, z_3, z_4)" in markdown_report(report, "t")


def test_an_early_exit_far_below_the_last_iterates_clean_accuracy_warns(monkeypatch) -> None:
    from deq_attacks.evaluation import protocol

    monkeypatch.setattr(protocol, "choose_early_exit", lambda *args: 1)
    monkeypatch.setattr(protocol, "EARLY_CLEAN_GAP", -1.0)  # any gap is "far" here
    dev, test = splits(8, 8)
    config = dataclasses.replace(TINY, attacks="pgd", bptt=False, diagnostic_samples=2)
    said: list[str] = []
    with pytest.warns(UserWarning, match="the early exit z_1 classifies"):
        report = evaluate_model(
            tiny_estimator(trained=True), test, dev, config, progress=said.append
        )
    clean = report.development["clean_accuracy_per_state"]
    assert report.development["early_exit_clean_gap"] == pytest.approx(clean[-1] - clean[0])
    assert any(line.startswith("warning: the early exit z_1") for line in said)


def test_nonfinite_rows_look_wrong_to_an_attack_and_finite_rows_are_untouched() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])

    def model(inputs: Tensor) -> Tensor:  # NaN for the first sample's neighbourhood only
        logits = torch.stack([inputs.sum(1), -inputs.sum(1), inputs[:, 0]], dim=1)
        return torch.where(inputs[:, :1] < 0.5, torch.tensor(float("nan")), logits)

    wrapped = NonFiniteAsWrong(model, x, y, eps=0.1)  # type: ignore[arg-type]
    probe = torch.tensor([[0.05, 0.0], [1.0, 0.95]])
    out = wrapped(probe)
    assert out[0].tolist() == [0.0, 1.0, 0.0]  # class 1: not label 0 of the sample within eps
    assert torch.equal(out[1], model(probe)[1])
    assert out[0].argmax() != y[0] and out[1].argmax() == 0
