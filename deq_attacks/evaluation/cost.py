"""The cost of an evaluation in f evaluations, before and while it runs.

One f evaluation is one sample's pass through the DEQ's layer f: a forward step of a solver,
an unrolled or adjoint step, or a VJP through f (the unit the paper's budgets are made of; the
hardware only sets its price). ``counting_f`` counts them (hooks on ``deq.f``); ``UnitCostProbe``
counts what one forward (defended logits) and one gradient with an estimate cost per sample on
the model itself; ``Attack.calls`` says how many of each an attack makes per sample;
``expected_costs`` turns the settings into the f evaluations of every step of a run, and
``seconds_per_f`` calibrates them to wall time with one timed batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.deq.readout import Final
from deq_attacks.evaluation.attacks import Column, ThreatModel
from deq_attacks.evaluation.scoring import defended_logits, model_input
from deq_attacks.gradients import GradientEstimate, loss_cotangent
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.interfaces.whitebox import eval_mode
from deq_attacks.solvers import Trajectory


@dataclass
class FCounter:
    """f evaluations counted so far (sample rows through f: forwards and VJPs)."""

    forwards: int = 0
    vjps: int = 0
    available: bool = True

    @property
    def total(self) -> int:
        return self.forwards + self.vjps


@contextmanager
def counting_f(deq: nn.Module) -> Iterator[FCounter]:
    """Count every f evaluation of ``deq`` while inside: each call of ``deq.f`` adds the rows
    of its output, and each VJP through such an output (a backward pass that reaches it) adds
    them again. A DEQ without an ``f`` module counts nothing (``available`` False)."""
    counter = FCounter()
    f = getattr(deq, "f", None)
    if not countable(deq):
        counter.available = False
        yield counter
        return
    assert isinstance(f, nn.Module)

    def on_forward(_module: nn.Module, _args: Any, output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() == 0:
            return
        rows = int(output.shape[0])
        counter.forwards += rows
        if output.requires_grad:

            def on_vjp(grad: Tensor) -> None:
                counter.vjps += rows

            # a functional transform's tensor refuses hooks: its VJP goes uncounted
            with contextlib.suppress(RuntimeError):
                output.register_hook(on_vjp)

    handle = f.register_forward_hook(on_forward)
    try:
        yield counter
    finally:
        handle.remove()


@dataclass(frozen=True)
class UnitCosts:
    """Per sample, f evaluations of one forward of the defended logits and of one gradient
    (forward and backward) with an estimate."""

    forward: float
    gradient: float


class UnitCostProbe:
    """Per-sample unit costs of estimates, counted on the few images ``x`` (two suffice): the
    f evaluations of one ``predict`` of the defended logits and of one gradient (what PGD calls
    per step; AutoAttack's backward goes the same way). One forward solve, counted once, is
    shared by every estimate's backward, so probing a sweep's many candidates costs one solve
    and their backwards; an estimate that reuses the forward's graphs (``reuses_forward``) is
    counted with its own solve. Calling the probe again with an estimate returns its count."""

    def __init__(self, model: DefendedModel | DEQEstimator, x: np.ndarray, y: np.ndarray) -> None:
        self._model = as_defended(model).view(defense=Final())
        self._white_box = self._model.white_box
        self._x = np.asarray(x)
        self._inputs = model_input(self._model, x)  # what the DEQ receives
        labels = torch.as_tensor(y, device=self._model.device)
        self._cotangent = loss_cotangent(nn.functional.cross_entropy, labels)
        self._forward: float | None = None
        self._solve: tuple[Trajectory, float] | None = None
        self._counted: dict[str, UnitCosts] = {}

    def counted(self) -> dict[str, list[float]]:
        """Estimate repr -> [forward, gradient] f evaluations per sample counted so far."""
        return {k: [u.forward, u.gradient] for k, u in self._counted.items()}

    def _per_sample(self, counter: FCounter) -> float:
        return counter.total / len(self._inputs)

    def forward(self) -> float:
        """f evaluations per sample of one forward of the defended logits."""
        if self._forward is None:
            with counting_f(self._model.deq) as counter:
                defended_logits(self._model, self._x)
            self._forward = self._per_sample(counter)
        return self._forward

    def _shared_solve(self) -> tuple[Trajectory, float]:
        """The forward solve every estimate's backward starts from (every iterate kept)."""
        if self._solve is None:
            deq = self._model.deq
            with eval_mode(deq), torch.no_grad(), counting_f(deq) as counter:
                trajectory = deq.solve(deq.inject(self._inputs), keep=True)
            self._solve = trajectory, self._per_sample(counter)
        return self._solve

    def __call__(self, estimate: GradientEstimate | None) -> UnitCosts:
        key = repr(estimate)
        if key not in self._counted:
            self._counted[key] = self._count(estimate)
        return self._counted[key]

    def _count(self, estimate: GradientEstimate | None) -> UnitCosts:
        if estimate is None:
            return UnitCosts(self.forward(), 0.0)
        deq = self._model.deq
        if estimate.reuses_forward:
            with counting_f(deq) as counter:
                self._white_box.input_gradient(self._inputs, self._cotangent, estimate)
            return UnitCosts(self.forward(), self._per_sample(counter))
        trajectory, solve = self._shared_solve()
        with counting_f(deq) as counter:
            self._white_box.input_gradient(self._inputs, self._cotangent, estimate, trajectory)
        return UnitCosts(self.forward(), solve + self._per_sample(counter))


def column_cost(
    column: Column, threat: ThreatModel, num_classes: int, units: UnitCosts
) -> float | None:
    """f evaluations per sample of one run of ``column`` on a sample it does not break (its
    attack's calls, then the scoring forward); None where the attack's calls are unknown."""
    calls = column.attack.calls(threat, num_classes)
    if calls is None:
        return None
    forwards, gradients = calls
    return (forwards + 1) * units.forward + gradients * units.gradient


def racing_rounds(candidates: int, n: int) -> list[tuple[int, int]]:
    """Successive halving's schedule over ``candidates`` on ``n`` development images:
    (candidates still racing, images seen) per round: the images double and the candidates
    halve each round, until one sees all ``n`` (one candidate: one round of ``n``)."""
    if candidates < 1 or n < 1:
        raise ValueError(f"need >= 1 candidate and image, got {candidates} and {n}")
    rounds = math.ceil(math.log2(candidates)) + 1 if candidates > 1 else 1
    schedule = []
    alive = candidates
    for r in range(rounds):
        seen = max(1, math.ceil(n / 2 ** (rounds - 1 - r)))
        schedule.append((alive, seen))
        alive = math.ceil(alive / 2)
    return schedule


def mode_costs(
    ordered: Sequence[float],
    n_test: int,
    n_dev: int,
    robust: float,
    audit_size: int = 59,
    kept: int = 1,
    cover: int | None = None,
) -> dict[str, float]:
    """The column work of one defense in each mode, in f evaluations, for columns of the given
    per-sample costs ordered strongest first, when the first ``kept`` of them break every
    sample they can and ``robust`` (a fraction) of the clean-correct samples survive all:

    - table: every column on every sample;
    - cascade: the kept columns on every sample, the weaker ones on the survivors;
    - verdict: the cascade on ``cover`` development images (the cover; None: all ``n_dev``),
      the kept columns on every test sample, the skipped ones on ``audit_size`` survivors.

    A model of the expected work (columns that break nothing new after the strongest), used for
    the paper-scale estimate of docs/benchmarks.md."""
    head, tail = sum(ordered[:kept]), sum(ordered[kept:])
    survivors = robust * n_test
    n_cover = n_dev if cover is None else min(cover, n_dev)
    return {
        "table": n_test * (head + tail),
        "cascade": n_test * head + survivors * tail,
        "verdict": n_cover * head + robust * n_cover * tail + n_test * head
        + min(audit_size, survivors) * tail,
    }


def seconds_per_f(
    model: DefendedModel | DEQEstimator, estimate: GradientEstimate, x: np.ndarray, y: np.ndarray
) -> float:
    """Wall seconds per f evaluation, from one timed batch: a forward and a gradient with
    ``estimate`` on ``x`` (the first a warm-up, the second timed)."""
    view = as_defended(model).view(estimate, Final())
    xt, yt = torch.as_tensor(x, device=view.device), torch.as_tensor(y, device=view.device)
    view.loss_gradient(xt, yt)
    with counting_f(view.deq) as counter:
        start = time.perf_counter()
        view.loss_gradient(xt, yt)
        spent = time.perf_counter() - start
    return spent / max(counter.total, 1)


def describe_cost(expected: Mapping[str, float], seconds: float) -> str:
    """One line per step and the total: expected f evaluations and wall time."""
    lines = [
        f"  {step:<12} {value:>14,.0f} f evaluations  ~{value * seconds:,.0f} s"
        for step, value in expected.items()
    ]
    total = sum(expected.values())
    lines.append(f"  {'total':<12} {total:>14,.0f} f evaluations  ~{total * seconds:,.0f} s")
    return "\n".join(lines)


def expected_costs(
    model: DefendedModel | DEQEstimator,
    config: Any,
    development: tuple[np.ndarray, np.ndarray],
    n_test: int,
    extra_estimates: Mapping[str, GradientEstimate] | None = None,
    defenses: int = 3,
) -> dict[str, Any]:
    """The f evaluations each step of a run with ``config`` (an ``EvaluationConfig``) is
    expected to cost, from the settings and per-sample unit costs counted on two development
    images. Before the sweep the chosen intermediate estimates are unknown: each family's
    costliest candidate stands for its pick. The grid's sweep: every candidate on the whole
    split; a race: its halving schedule (``racing_rounds``) at the costliest candidate's
    price, an upper bound (a race that reaches 0% stops early). Table mode's columns are exact for
    fixed-step attacks and an upper bound for attacks that stop on success; cascade and
    verdict modes are bounded by the table (verdict: and the cover on ``cover_size``
    development images).

    Returns ``{"steps": {step: f evaluations}, "unknown_columns": [labels; "entropy defense"
    for its step when on], "bound": whether
    the columns' figure is an upper bound, "countable", "units": estimate repr -> [forward,
    gradient] f evaluations per sample}`` (every sweep candidate and its ensemble among them;
    a DEQ without an ``f`` module: no steps, ``countable`` False)."""
    from deq_attacks.evaluation.columns import protocol_columns, protocol_estimates
    from deq_attacks.evaluation.settings import Mode, SweepMode
    from deq_attacks.gradients import BackpropThroughSolver, ready_made, sweep_family

    x_dev, y_dev = development
    probe_x, probe_y = x_dev[:2], y_dev[:2]
    defended = as_defended(model)
    deq = defended.deq
    if not countable(deq):
        return {"steps": {}, "unknown_columns": [], "bound": True, "countable": False, "units": {}}
    cost_of = UnitCostProbe(defended, probe_x, probe_y)

    threat, n_dev = config.threat, len(x_dev)
    ready = ready_made(deq.training_gradient)
    pgd = lambda e: threat.steps * cost_of(e).gradient + cost_of(e).forward  # noqa: E731
    # the ready-made PGD on the development split, and its clean scores
    steps: dict[str, float] = {"early_exit": n_dev * (pgd(ready) + cost_of(None).forward)}
    chosen: dict[str, GradientEstimate] = {}
    sweep = 0.0
    for family, candidates in config.sweep.candidates(deq.solver).items():
        costs = [pgd(c) for c in candidates]
        if config.sweep_mode is SweepMode.RACING and candidates:  # its halving schedule
            schedule = racing_rounds(len(candidates), n_dev)
            new = np.diff([0, *(seen for _, seen in schedule)])
            sweep += max(costs) * float(np.dot([alive for alive, _ in schedule], new))
        else:
            sweep += n_dev * sum(costs)
        chosen[family] = candidates[int(np.argmax(costs))]
        for candidate in candidates:  # every pick's ensemble: the column costs reuse them
            cost_of(sweep_family(family).ensemble(candidate))
    steps["sweep"] = sweep
    steps["clean"] = n_test * cost_of(None).forward
    extras = dict(extra_estimates or {})
    if config.bptt:
        extras = {"bptt": BackpropThroughSolver(checkpoint=config.bptt_checkpoint), **extras}
    columns = protocol_columns(protocol_estimates(ready, chosen, extras), config)
    per_sample, unknown = 0.0, []
    for column in columns:
        cost = column_cost(column, threat, defended.nb_classes, cost_of(column.estimate))
        if cost is None:
            unknown.append(column.label)
            continue
        per_sample += cost * (1 if column.shared else defenses)
    steps["columns"] = n_test * per_sample
    if config.entropy_defense:  # its inner input updates are not counted in advance
        unknown.append("entropy defense")
    if config.mode is Mode.VERDICT:  # the cover on (part of) the development split
        cover = n_dev if config.cover_size is None else min(config.cover_size, n_dev)
        steps["columns"] += cover * per_sample
    bound = config.mode is not Mode.TABLE
    return {
        "steps": steps,
        "unknown_columns": unknown,
        "bound": bound,
        "countable": True,
        "units": cost_of.counted(),
    }


def countable(deq: nn.Module) -> bool:
    """Whether ``counting_f`` can count ``deq``'s f evaluations (it has an ``f`` module)."""
    return isinstance(getattr(deq, "f", None), nn.Module)
