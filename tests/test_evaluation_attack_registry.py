"""A new attack column is one class and one registration: defined here, in the test file alone,
registered for the test's scope, it becomes a column per gradient estimate of the protocol, its
settings go into the results, and it receives each column's estimate. An attack with its own
budget is built from its spec text (``"mine:budget=3"``), and the budget reaches its runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from evaluation_fixtures import SQUARE, TINY, splits, tiny_estimator

from deq_attacks.evaluation import (
    Attack,
    AttackOutput,
    DefendedModel,
    EvaluationConfig,
    SampleSeeds,
    SweepConfig,
    ThreatModel,
    attack_names,
    evaluate_model,
    register_attack,
    scoped_attacks,
)
from deq_attacks.evaluation.attacks import attack_text, parse_attack, parse_attacks


@dataclass(frozen=True)
class FGSM(Attack):
    """One signed-gradient step of size eps from the clean input (Goodfellow et al. 2015)."""

    label: ClassVar[str] = "FGSM"
    seen: ClassVar[list[str]] = []

    def run(
        self,
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        FGSM.seen.append(repr(model.estimate))
        grad = model.loss_gradient(torch.as_tensor(x), torch.as_tensor(y))
        return AttackOutput(np.clip(x + threat.eps * np.sign(grad.numpy()), 0, 1))

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        return {"budget": 1, "step": threat.eps}


def test_a_column_defined_and_registered_here_runs_in_the_protocol() -> None:
    config = dataclasses.replace(
        TINY,
        bptt=False,
        sweep=SweepConfig({"adjoint": {"n": "1", "beta": "1.0"},
                           "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}),
    )  # fmt: skip
    with scoped_attacks():
        register_attack("fgsm")(FGSM)
        assert "fgsm" in attack_names()
        with pytest.raises(ValueError, match="already registered"):
            register_attack("pgd")(FGSM)
        config = dataclasses.replace(config, attacks=f"pgd,fgsm,{SQUARE}")
        dev, test = splits()
        FGSM.seen.clear()
        report = evaluate_model(tiny_estimator(trained=True), test, dev, config)
    estimates = ["ready-made", "exact", "adjoint z_1", "unrolled z_1", "ens. adjoint",
                 "ens. unrolled"]  # fmt: skip
    assert list(report.columns) == [f"{e} {a}" for e in estimates for a in ("PGD", "FGSM")] + [
        "square"
    ]
    assert report.columns["ready-made FGSM"]["attack"] == "fgsm"
    assert report.columns["ready-made FGSM"]["budget"] == 1
    assert report.columns["exact FGSM"]["estimate_spec"]["estimate"] == "exact"
    # a run per defense and estimate (FGSM is not declared shared), in blocks of 8 samples,
    # each with its column's estimate
    assert len(FGSM.seen) == 3 * len(estimates) * 2
    assert set(FGSM.seen) == {report.columns[f"{e} FGSM"]["estimate"] for e in estimates}
    for defense in report.defenses:
        assert len(report.survived[defense]["unrolled z_1 FGSM"]) == len(test[0])
    # the scope ended: the paper's columns only
    assert "fgsm" not in attack_names()
    with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
        EvaluationConfig(attacks="pgd,fgsm")


@dataclass(frozen=True)
class IteratedFGSM(Attack):
    """``budget`` signed-gradient steps of size eps / budget from the clean input (the basic
    iterative method without a random start), and a shared setting it takes."""

    label: ClassVar[str] = "I-FGSM"
    takes: ClassVar[tuple[str, ...]] = ("eot_draws",)
    budgets: ClassVar[dict[str, str]] = {"budget": "I-FGSM steps"}
    calls_seen: ClassVar[list[tuple[int, int]]] = []
    budget: int = 1
    eot_draws: int = 1

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")

    def run(
        self,
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        x_adv = x.copy()
        for _ in range(self.budget):
            IteratedFGSM.calls_seen.append((self.budget, self.eot_draws))
            grad = model.loss_gradient(torch.as_tensor(x_adv), torch.as_tensor(y)).numpy()
            x_adv = np.clip(x_adv + threat.eps / self.budget * np.sign(grad), x - threat.eps,
                            x + threat.eps).clip(0, 1).astype(np.float32)  # fmt: skip
        return AttackOutput(x_adv)

    def calls(self, threat: ThreatModel, num_classes: int) -> tuple[float, float]:
        return 0.0, float(self.budget)

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        return {"budget": self.budget, "step": threat.eps / self.budget}


def test_an_attack_with_its_own_budget_is_built_from_its_spec_and_runs_with_it() -> None:
    config = dataclasses.replace(
        TINY, bptt=False,
        sweep=SweepConfig({"adjoint": {"n": "1", "beta": "1.0"},
                           "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}),
    )  # fmt: skip
    with scoped_attacks():
        register_attack("mine")(IteratedFGSM)
        # its spec: its budget, typed by its field, checked by the class; shared settings are
        # the protocol's, not part of the spec
        assert parse_attack("mine:budget=3") == IteratedFGSM(budget=3)
        assert attack_text(IteratedFGSM(budget=3)) == "mine:budget=3"
        with pytest.raises(ValueError, match="setting budget='three': expected int"):
            EvaluationConfig(attacks="pgd,mine:budget=three")
        with pytest.raises(ValueError, match="budget must be >= 1"):
            EvaluationConfig(attacks="pgd,mine:budget=0")
        with pytest.raises(ValueError, match="attack 'mine' has no setting 'eot_draws'"):
            EvaluationConfig(attacks="pgd,mine:eot_draws=2")
        config = dataclasses.replace(
            config, attacks="pgd,mine:budget=3,square:queries=5", eot_draws=2
        )
        assert config.attacks == "pgd,mine:budget=3,square:queries=5"
        mine = config.attack_specs[1]
        assert mine == IteratedFGSM(budget=3, eot_draws=2)
        assert mine.budget_marks() == [("I-FGSM steps", 3, True)]
        dev, test = splits()
        IteratedFGSM.calls_seen.clear()
        report = evaluate_model(tiny_estimator(trained=True), test, dev, config)
    # the budget and the shared setting reached every run: 3 steps per block, each with both
    assert IteratedFGSM.calls_seen and set(IteratedFGSM.calls_seen) == {(3, 2)}
    assert report.columns["ready-made I-FGSM"]["attack"] == "mine"
    assert report.columns["ready-made I-FGSM"]["budget"] == 3
    assert report.settings["config"]["attacks"] == "pgd,mine:budget=3,square:queries=5"
    # three calls per block of each column: a run per defense and estimate
    estimates = 6  # ready-made, exact, two chosen candidates, two gradient ensembles
    assert len(IteratedFGSM.calls_seen) == 3 * 3 * estimates * 2


def test_names_follow_the_one_rule_and_a_dash_reads_as_underscore() -> None:
    assert parse_attacks("pgd, apgd-ce, art-autoattack") == parse_attacks(
        "pgd,apgd_ce,art_autoattack"
    )
    assert EvaluationConfig(attacks="pgd,apgd-ce").attacks == "pgd,apgd_ce"
    spec = "pgd,autoattack:iterations=5,queries=50,target_classes=2,square:queries=100"
    assert [attack_text(a) for a in parse_attacks(spec)] == [
        "pgd", "autoattack:iterations=5,queries=50,target_classes=2", "square:queries=100"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="a name is lower-case letters, digits and '_'"):
        parse_attacks("pgd,APGD")
    with pytest.raises(ValueError, match="comes before any name"):
        parse_attacks("queries=5,pgd")


def test_registration_is_checked() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        register_attack("FGSM")
    with pytest.raises(ValueError, match="registered as 'my_attack'"):
        register_attack("my-attack")
    with scoped_attacks(), pytest.raises(TypeError, match="Attack subclass"):
        register_attack("thing")(object)  # type: ignore[type-var]

    @dataclass(frozen=True)
    class Odd(IteratedFGSM):
        takes: ClassVar[tuple[str, ...]] = ("budget",)

    with scoped_attacks(), pytest.raises(TypeError, match="takes: some of eot_draws"):
        register_attack("odd")(Odd)
