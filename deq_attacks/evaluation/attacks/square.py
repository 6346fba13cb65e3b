"""Square (Andriushchenko et al. 2020), L-inf or L2 with the margin loss, through
``pyautoattack``: a query attack that uses no gradient, one column, per defense. Its draws
are per sample (``per_sample.PerSampleSquare``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from deq_attacks.adversarial.defended import DefendedModel, NonFiniteAsWrong
from deq_attacks.adversarial.seeds import SampleSeeds
from deq_attacks.evaluation.attacks.base import Attack, AttackOutput, register_attack
from deq_attacks.evaluation.attacks.per_sample import PerSampleSquare
from deq_attacks.evaluation.threat import ThreatModel


@register_attack("square")
@dataclass(frozen=True)
class Square(Attack):
    """Square with ``queries`` queries (p_init 0.8, one restart, the schedule of p rescaled to
    the query budget); its spec: ``square:queries=5000,p_init=0.8``."""

    label: ClassVar[str] = "square"
    uses_estimate: ClassVar[bool] = False
    budgets: ClassVar[Mapping[str, str]] = {"queries": "Square column queries"}
    queries: int = 5000
    p_init: float = 0.8

    def __post_init__(self) -> None:
        if isinstance(self.queries, bool) or not isinstance(self.queries, int) or self.queries < 1:
            raise ValueError(f"square queries must be an int >= 1, got {self.queries!r}")
        if not 0 < self.p_init <= 1:
            raise ValueError(f"square p_init must be in (0, 1], got {self.p_init!r}")

    def run(
        self,
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        xt = torch.as_tensor(x, device=model.device)
        yt = torch.as_tensor(y, device=model.device)
        square = PerSampleSquare(
            NonFiniteAsWrong(model, xt, yt, threat.eps, threat.norm),
            norm=threat.norm, n_queries=self.queries, eps=threat.eps, p_init=self.p_init,
            n_restarts=1, seed=0, verbose=False, device=xt.device, resc_schedule=True,
        )  # fmt: skip
        return AttackOutput(square.run(xt, yt, seeds).detach().cpu().numpy())

    def calls(self, threat: ThreatModel, num_classes: int) -> tuple[float, float]:
        return float(self.queries + 1), 0.0  # the clean margin, then one query per step

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        return {"budget": self.queries, "p_init": self.p_init, "loss": "margin"}
