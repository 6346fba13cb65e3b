"""The input-entropy-reduction defense (``deq_attacks.deq.entropy``) evaluated as its authors did
and adaptively.

Columns (each a bool per sample: correct under the defense after the attack):

- ``clean``: the defended prediction of the clean image (``clean undefended``: without it).
- ``non-adaptive PGD``: as Yang et al. (2023) evaluate it: PGD crafted on the undefended DEQ
  (their ``for_attack=True``; here with the exact gradient of the undefended logits, BPTT),
  scored with the defense on. Not an adaptive attack (Tramer et al. 2020).
- ``adaptive PGD (BPTT)``: PGD on the defended logits with their exact gradient, autograd
  through every solver step and every inner input update (``entropy_defended_logits``,
  ``differentiable=True``).
- ``adaptive PGD (BPDA)``: the same with the inner input updates straight-through (BPDA).
- ``adaptive PGD (BPDA, identity)``: BPDA over the whole defense: the undefended DEQ's
  gradient (``craft_estimate``, the non-adaptive run's), every iterate checked with the
  defense on. It follows the non-adaptive run's iterates, so per sample it is never weaker.
  Every adaptive PGD keeps a sample's first iterate that the defended model misclassifies
  (``defense_aware_pgd``).
- ``adaptive AutoAttack`` (optional): the standard AutoAttack (pyautoattack, per-sample draws)
  against the defended module with the exact gradient.
- ``adaptive worst case``: per sample, correct under the defense clean and after every
  adaptive attack (a sample is robust only if it survives all of them).

The defense is deterministic (no random draw in its forward), so expectation over
transformation has nothing to average: EOT with any number of draws equals the single-draw
gradient, and no EOT column is run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.adversarial.pgd import STEPS, random_start
from deq_attacks.deq import DEQModel, Final
from deq_attacks.deq.entropy import InputEntropyReduction, entropy_defended_logits
from deq_attacks.evaluation.aggregate import wilson_interval
from deq_attacks.evaluation.attacks import (
    AutoAttackSettings,
    SampleSeeds,
    ThreatModel,
    fixed_step_pgd,
    run_standard_autoattack,
)
from deq_attacks.evaluation.scoring import defended_logits
from deq_attacks.gradients import BackpropThroughSolver, GradientEstimate
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.records import to_jsonable

#: The backward of the defended module: the exact gradient, or BPDA over the input updates.
GRADIENTS = ("bptt", "bpda")


class EntropyDefendedModule(nn.Module):
    """The defended DEQ as a torch module: inputs (B, ...) in [0, 1] -> defended logits.

    With autograd on, the forward records the whole defended computation and the backward is
    its exact gradient (``gradient="bptt"``) or BPDA over the input updates (``"bpda"``);
    under ``torch.no_grad()`` it runs without a graph.
    """

    def __init__(
        self, deq: DEQModel, defense: InputEntropyReduction, gradient: str = "bptt"
    ) -> None:
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        self.deq = deq
        self.defense = defense
        self.gradient = gradient

    def forward(self, x: Tensor) -> Tensor:
        differentiable = torch.is_grad_enabled()
        return entropy_defended_logits(
            self.deq, x, self.defense, differentiable=differentiable,
            straight_through=differentiable and self.gradient == "bpda",
        )  # fmt: skip


def defense_aware_pgd(
    gradient: Callable[[Tensor, Tensor], Tensor],
    defended: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    seeds: SampleSeeds,
) -> Tensor:
    """PGD along ``gradient(x_adv, y)`` (dL/dx (B, ...)): ``threat.steps`` steps of
    ``threat.step`` in ``threat.norm`` from the per-sample random start, projected to the
    eps-ball and [0, 1]. Every iterate (the start and the last included) is checked with the
    defense on; a sample's result is its first iterate that ``defended`` misclassifies, else
    its last iterate."""
    x0 = x.detach()
    start = random_start(x0.cpu().numpy(), threat.eps, seeds, threat.norm)
    x_adv = torch.as_tensor(start, device=x.device) if threat.random_start else x0.clone()
    result = x_adv.clone()
    fooled = torch.zeros(len(x0), dtype=torch.bool, device=x.device)
    step = STEPS[threat.norm]
    for iteration in range(threat.steps + 1):
        with torch.no_grad():
            new = (defended(x_adv).argmax(1) != y) & ~fooled
        result[new] = x_adv[new]
        fooled |= new
        if iteration == threat.steps or bool(fooled.all()):
            break
        x_adv = step(x_adv, gradient(x_adv, y).to(x_adv.dtype), x0, threat.eps, threat.step)
    result[~fooled] = x_adv[~fooled]
    return result.detach()


def autograd_gradient(module: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """dL/dx of the summed cross-entropy of ``module``'s logits, by its own autograd."""

    def gradient(x: Tensor, y: Tensor) -> Tensor:
        probe = x.detach().requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(module(probe).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, probe)
        return grad

    return gradient


#: The authors' column and the per-sample worst case over the adaptive attacks.
NON_ADAPTIVE, WORST = "non-adaptive PGD", "adaptive worst case"

#: What each kind of column is (``kind``).
KINDS = {
    "clean": "the defended prediction of the clean image",
    "undefended": "the undefended DEQ (a reference, not the defense)",
    "non-adaptive": "PGD crafted with the defense off, scored with it on: the authors' "
    "evaluation, not an adaptive attack",
    "adaptive": "an attack on the defended model itself",
    "adaptive worst case": "per sample: correct under the defense clean and after every "
    "adaptive attack",
}


def kind(column: str) -> str:
    """The kind of a column (a key of ``KINDS``)."""
    if column.endswith("undefended"):
        return "undefended"
    named = {"clean": "clean", NON_ADAPTIVE: "non-adaptive", WORST: "adaptive worst case"}
    if column in named:
        return named[column]
    if column.startswith("adaptive"):
        return "adaptive"
    raise ValueError(f"no entropy-defense column {column!r}")


@dataclass
class EntropyDefenseResult:
    """Per-sample correctness under the defense, per column (module docstring).

    Attributes:
        correct: column -> bool (S,).
        settings: the threat model, the defense, the attacks' settings (JSON).
    """

    correct: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, column: str) -> tuple[float, float, float]:
        """(accuracy, 95% Wilson low, high) of a column."""
        values = self.correct[column]
        low, high = wilson_interval(int(values.sum()), len(values))
        return float(values.mean()), low, high

    def markdown(self) -> str:
        """One row per column: accuracy (%) and its 95% Wilson interval."""
        lines = ["| column | accuracy (%) | 95% Wilson interval |", "|---|---|---|"]
        for column in self.correct:
            acc, low, high = self.accuracy(column)
            lines.append(f"| {column} | {100 * acc:.1f} | [{100 * low:.1f}, {100 * high:.1f}] |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The settings; per column its kind (``kind``), accuracy with interval and per-sample
        flags; the authors' non-adaptive number and the adaptive worst case, labelled."""
        accuracy = {c: dict(zip(("accuracy", "low", "high"), self.accuracy(c), strict=True))
                    for c in self.correct}  # fmt: skip
        worst = self.correct[WORST]
        return {
            "settings": self.settings,
            "kind": {c: kind(c) for c in self.correct},
            "non_adaptive": {**accuracy[NON_ADAPTIVE], "column": NON_ADAPTIVE,
                             "note": KINDS["non-adaptive"]},  # fmt: skip
            "adaptive_worst_case": {**accuracy[WORST], "k": int(worst.sum()), "n": len(worst),
                                    "note": KINDS["adaptive worst case"]},  # fmt: skip
            "accuracy": accuracy,
            "correct": {c: v.astype(bool).tolist() for c, v in self.correct.items()},
        }


def evaluate_entropy_defense(
    model: DefendedModel | DEQEstimator,
    x: np.ndarray,
    y: np.ndarray,
    threat: ThreatModel,
    defense: InputEntropyReduction,
    *,
    craft_estimate: GradientEstimate | None = None,
    autoattack: AutoAttackSettings | None = None,
    seed: int = 0,
    batch_size: int = 50,
    progress: Callable[[str], None] | None = None,
    index: np.ndarray | None = None,
) -> EntropyDefenseResult:
    """The defense's columns on (x, y) (module docstring).

    Args:
        model: the DEQ (no preprocessing: the defense updates pixels in [0, 1]), a
            ``DefendedModel`` (a ``DEQEstimator`` is read by ``DefendedModel.of``); the
            undefended model is its Final readout, the state the defense reads out too.
        x, y: images (S, ...) float32 in [0, 1] and labels (S,).
        threat: the attacks' threat model.
        defense: the defense's settings.
        craft_estimate: the gradient of the non-adaptive PGD on the undefended DEQ (default:
            BPTT, its exact gradient).
        autoattack: run the standard AutoAttack with these budgets against the defended
            module (exact gradient) too; None: not.
        seed: per-sample seeds of every random start.
        batch_size: samples per attack batch (results do not depend on it).
        progress: told of each column.
        index: the samples' ids (S,) for their per-sample seeds (default 0..S-1): a sample's
            result does not depend on the part of a split it is evaluated in.
    """
    defended = as_defended(model)
    check_defendable(defended, defense)
    ids = np.arange(len(x)) if index is None else np.asarray(index, dtype=np.int64)
    if ids.shape != (len(x),):
        raise ValueError(f"index must give one id per sample ({len(x)}), got {ids.shape}")
    say = progress or (lambda _text: None)
    deq = defended.deq
    craft = craft_estimate if craft_estimate is not None else BackpropThroughSolver()
    modules = {g: EntropyDefendedModule(deq, defense, g) for g in GRADIENTS}
    undefended = defended.view(craft, Final())
    device = defended.device
    columns: dict[str, list[np.ndarray]] = {}

    def defended_correct(images: Tensor, labels: Tensor) -> np.ndarray:
        with torch.no_grad():
            return (modules["bptt"](images).argmax(1) == labels).cpu().numpy()

    for start in range(0, len(x), batch_size):
        part = np.arange(start, min(start + batch_size, len(x)))
        seeds = ids[part]
        xb = torch.as_tensor(x[part], device=device)
        yb = torch.as_tensor(y[part], device=device)
        found: dict[str, np.ndarray] = {}
        with torch.no_grad():
            found["clean undefended"] = defended_logits(undefended, x[part]).argmax(1) == y[part]
        found["clean"] = defended_correct(xb, yb)
        say(f"samples {seeds[0]}..{seeds[-1]}: non-adaptive PGD (crafted without the defense)")
        crafted = fixed_step_pgd(
            undefended, craft, x[part], y[part], threat, seed=SampleSeeds(seed, "pgd", seeds)
        )
        crafted_t = torch.as_tensor(crafted, device=device)
        with torch.no_grad():
            found["non-adaptive PGD, undefended"] = (
                defended_logits(undefended, crafted).argmax(1) == y[part]
            )
        found[NON_ADAPTIVE] = defended_correct(crafted_t, yb)
        gradients = {
            "BPTT": autograd_gradient(modules["bptt"]),
            "BPDA": autograd_gradient(modules["bpda"]),
            "BPDA, identity": undefended.loss_gradient,
        }
        for name, gradient in gradients.items():
            say(f"samples {seeds[0]}..{seeds[-1]}: adaptive PGD ({name})")
            adv = defense_aware_pgd(
                gradient, modules["bptt"], xb, yb, threat, SampleSeeds(seed, "pgd", seeds)
            )
            found[f"adaptive PGD ({name})"] = defended_correct(adv, yb)
        if autoattack is not None:
            say(f"samples {seeds[0]}..{seeds[-1]}: adaptive AutoAttack")
            outcome = run_standard_autoattack(
                modules["bptt"], xb, yb, threat.eps, autoattack, defended.nb_classes,
                SampleSeeds(seed, "autoattack", seeds), norm=threat.norm,
            )  # fmt: skip
            found["adaptive AutoAttack"] = outcome.survived
        for name, values in found.items():
            columns.setdefault(name, []).append(np.asarray(values, dtype=bool))
    correct = {name: np.concatenate(parts) for name, parts in columns.items()}
    adaptive = [c for c in correct if c.startswith("adaptive")]
    correct[WORST] = np.logical_and.reduce(
        [correct["clean"], *(correct[c] for c in adaptive)]
    )
    return EntropyDefenseResult(
        correct, defense_settings(threat, defense, craft, autoattack, seed, len(x))
    )


def check_defendable(model: DefendedModel | DEQEstimator, defense: InputEntropyReduction) -> None:
    """Raise (one line) unless the defense can run on ``model``: no preprocessing (it updates
    the pixels the DEQ receives) and a solver threshold of at least one round."""
    defended = as_defended(model)
    if defended.preprocesses:
        raise ValueError(
            "the entropy defense updates the pixels the DEQ receives: give an estimator "
            "without preprocessing (normalise inside the model)"
        )
    defense.rounds(defended.deq.solver.threshold)


def defense_settings(
    threat: ThreatModel,
    defense: InputEntropyReduction,
    craft: GradientEstimate,
    autoattack: AutoAttackSettings | None,
    seed: int,
    n: int,
) -> dict[str, Any]:
    """The settings (JSON) of ``evaluate_entropy_defense``'s result on ``n`` samples."""
    return {
        "threat": to_jsonable(threat),
        "defense": to_jsonable(defense),
        "craft_estimate": repr(craft),
        "autoattack": None if autoattack is None else autoattack.describe(),
        "seed": seed,
        "n": n,
        "eot": "none: the defense is deterministic (EOT would average identical gradients)",
    }

