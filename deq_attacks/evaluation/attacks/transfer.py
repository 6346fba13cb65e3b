"""The transfer column (Carlini et al. 2019's checklist; RobustBench's check that marked
Kang2021Stable unreliable): adversarial examples crafted by APGD-CE on a surrogate, then scored
on every defense.

The surrogate is the DEQ itself unrolled to a fixed depth as an explicit network
(``UnrolledSurrogate``: ``depth`` applications of the DEQ's own f from its ``z_0``, then its
head, differentiated by plain autograd through every step), or a user's own model: an
``nn.Module``, or the text ``"package.module:attribute"`` naming one, or naming a function that
takes the defended model (``DefendedModel``: its ``deq``, ``preprocess``, ``nb_classes``,
``input_shape``, ``device``) and returns one. APGD is the original one (pyautoattack's, with each
sample's random start from its own seeds: ``per_sample.PerSampleAPGD``). It never looks at the
defended output, so one run scores every defense.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from deq_attacks.adversarial.seeds import SampleSeeds
from deq_attacks.deq.contract import DEQModel
from deq_attacks.evaluation.attacks.base import Attack, AttackOutput, register_attack
from deq_attacks.evaluation.attacks.per_sample import PerSampleAPGD
from deq_attacks.evaluation.threat import ThreatModel
from deq_attacks.registry import entry_point

if TYPE_CHECKING:
    from deq_attacks.adversarial.defended import DefendedModel


class UnrolledSurrogate(nn.Module):
    """The DEQ unrolled to ``depth`` steps as an explicit network: ``z_0`` from the DEQ, then
    ``z_{t+1} = f(z_t; x)`` ``depth`` times, then the head; plain autograd through every step.
    Inputs (B, ...) in [0, 1] go through the model's preprocessing first.

    Args:
        model: the defended model whose DEQ (f, injection, head) is unrolled; shared, not
            copied.
        depth: the number of f applications, >= 1.
    """

    def __init__(self, model: DefendedModel, depth: int) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"the surrogate's depth must be an int >= 1, got {depth!r}")
        deq = model.deq
        if not isinstance(deq, DEQModel):
            raise TypeError(f"unrolling needs a DEQModel, got {type(deq).__name__}")
        self.preprocess = model.preprocess
        self.deq = deq
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        processed = self.preprocess(x)
        self.deq.reset()
        injection = self.deq.inject(processed)
        z = self.deq.initial_state(injection).reshape(len(processed), -1)
        for _ in range(self.depth):
            z = self.deq.step(z, injection)
        return self.deq.logits(z, injection).float()

    def extra_repr(self) -> str:
        return f"depth={self.depth}"


def load_surrogate(text: str, model: DefendedModel) -> nn.Module:
    """The user's surrogate named ``"package.module:attribute"``: the attribute itself if it is
    an ``nn.Module``, else ``attribute(model)`` (the defended model), which must return one."""
    found = entry_point(text, f"surrogate {text!r}")
    if not isinstance(found, nn.Module):
        if not callable(found):
            raise ValueError(f"surrogate {text!r} is a {type(found).__name__}, not a module")
        found = found(model)
    if not isinstance(found, nn.Module):
        raise TypeError(f"surrogate {text!r} returned {type(found).__name__}, not an nn.Module")
    return found


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside, its own mode restored after."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@register_attack("transfer")
@dataclass(frozen=True)
class TransferAPGD(Attack):
    """APGD-CE (``iterations`` iterations, one restart) on a surrogate, each sample's
    highest-loss point kept (``perturb(best_loss=True)``); the examples are scored on every
    defense of the model.

    Args:
        surrogate: an ``nn.Module`` (inputs in [0, 1] to logits), the text
            ``"package.module:attribute"`` (see ``load_surrogate``), or None: the DEQ unrolled
            to ``depth`` steps (``UnrolledSurrogate``).
        depth: the unrolled surrogate's depth (None: the solver's threshold).
        iterations: APGD iterations.
        eot_draws: APGD's gradient averaged over this many draws per step (a randomized
            surrogate; pyautoattack's ``eot_iter``); shared (``EvaluationConfig.eot_draws``).

    Its spec: ``transfer:surrogate=package.module:attribute,iterations=100`` or
    ``transfer:depth=8`` (the unrolled DEQ).
    """

    label: ClassVar[str] = "transfer"
    shared: ClassVar[bool] = True
    uses_estimate: ClassVar[bool] = False
    takes: ClassVar[tuple[str, ...]] = ("eot_draws",)
    surrogate: nn.Module | str | None = None
    depth: int | None = None
    iterations: int = 100
    eot_draws: int = 1

    def __post_init__(self) -> None:
        if not (self.surrogate is None or isinstance(self.surrogate, (nn.Module, str))):
            raise TypeError(
                f"surrogate must be an nn.Module, 'package.module:attribute' or None, got "
                f"{self.surrogate!r}"
            )
        for name in ("iterations", "eot_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"transfer {name} must be an int >= 1, got {value!r}")
        if self.depth is not None and (
            isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1
        ):
            raise ValueError(f"transfer depth must be an int >= 1 or None, got {self.depth!r}")
        if self.depth is not None and self.surrogate is not None:
            raise ValueError("transfer depth is for the unrolled surrogate, not a user's surrogate")

    def model_for(self, model: DefendedModel) -> nn.Module:
        """The surrogate over ``model``, on its device."""
        if self.surrogate is None:
            depth = self.depth if self.depth is not None else model.deq.solver.threshold
            return UnrolledSurrogate(model, depth)
        module = self.surrogate
        if isinstance(module, str):
            module = load_surrogate(module, model)
        return module.to(model.device)

    def run(
        self,
        model: DefendedModel,
        x: np.ndarray,
        y: np.ndarray,
        threat: ThreatModel,
        seeds: SampleSeeds,
    ) -> AttackOutput:
        surrogate = self.model_for(model)
        xt = torch.as_tensor(x, device=model.device)
        yt = torch.as_tensor(y, device=model.device)
        apgd = PerSampleAPGD(
            surrogate, norm=threat.norm, eps=threat.eps, n_iter=self.iterations,
            n_restarts=1, eot_iter=self.eot_draws, rho=0.75, seed=seeds.shared_seed("transfer"),
            device=xt.device,
        )  # fmt: skip
        apgd.loss = "ce"
        # every sample's highest-loss point on the surrogate (APGD's best_loss), whether or
        # not it fools the surrogate: what fools the defense is decided when scoring
        with _evaluating(surrogate), apgd.seeded(xt, yt, seeds, "transfer"):
            x_adv = apgd.perturb(xt, yt, best_loss=True)
        return AttackOutput(x_adv.detach().cpu().numpy().astype(np.float32))

    def describe(self, threat: ThreatModel) -> dict[str, Any]:
        surrogate = self.surrogate
        shown = (
            f"DEQ unrolled ({'solver threshold' if self.depth is None else self.depth} steps)"
            if surrogate is None
            else surrogate if isinstance(surrogate, str) else type(surrogate).__name__
        )
        return {
            "surrogate": shown, "attack": "APGD-CE", "budget": self.iterations,
            "eot_draws": self.eot_draws, "norm": threat.norm,
        }  # fmt: skip
