"""A new attack column is one class and one registration: defined here, in the test file alone,
registered for the test's scope, it becomes a column per gradient estimate of the protocol, its
settings go into the results, and it receives each column's estimate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from evaluation_fixtures import TINY, splits, tiny_estimator

from deq_attacks.evaluation import (
    Attack,
    AttackOutput,
    EvaluationConfig,
    SampleSeeds,
    SweepConfig,
    ThreatModel,
    attack_names,
    evaluate_model,
    register_attack,
    scoped_attacks,
)


@dataclass(frozen=True)
class FGSM(Attack):
    """One signed-gradient step of size eps from the clean input (Goodfellow et al. 2015)."""

    label: ClassVar[str] = "FGSM"
    seen: ClassVar[list[str]] = []

    @classmethod
    def from_config(cls, config: EvaluationConfig) -> FGSM:
        return cls()

    def run(
        self, model: Any, x: np.ndarray, y: np.ndarray, threat: ThreatModel, seeds: SampleSeeds
    ) -> AttackOutput:
        FGSM.seen.append(repr(model.gradient_estimate))
        grad = torch.as_tensor(model.loss_gradient(x, y))
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
        config = dataclasses.replace(config, attacks="pgd,fgsm,square")
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


def test_registration_is_checked() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        register_attack("FGSM")
    with scoped_attacks(), pytest.raises(TypeError, match="Attack subclass"):
        register_attack("thing")(object)  # type: ignore[type-var]
