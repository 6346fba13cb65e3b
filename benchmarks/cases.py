"""The measured ratios. Each case times (or measures) two things side by side and returns rows.

Every forward solve here uses ``tol=0`` so that it runs all its iterates: the cost then does not
depend on how far an untrained model happens to converge (a trained DEQ is far from its fixed
point after 8 steps anyway: relative residual ~0.2). Each row says whether that held.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.memory import peak_bytes
from benchmarks.timing import paired_ratio
from benchmarks.workloads import Settings, Workload
from deq_attacks import (
    DEQ,
    Adjoint,
    Anderson,
    BackpropThroughSolver,
    Broyden,
    DEQEstimator,
    Early,
    Ensemble,
    Final,
    FixedPointIteration,
    GradientEnsemble,
    GradientEstimate,
    ImplicitGradient,
    Phantom,
    PhantomGradient,
    Readout,
    Unrolled,
)
from deq_attacks.acceleration import Acceleration
from deq_attacks.gradients import input_gradient, loss_cotangent
from deq_attacks.solvers import Solver, Trajectory
from deq_attacks.training import loop as training_loop
from deq_attacks.training.adversary import art_classifier, pgd_attack
from deq_attacks.training.build import TrainingModule, optimizer_and_schedule
from deq_attacks.training.presets import PAPER

EPS = 8 / 255
EPS_STEP = 2 / 255


@dataclass
class Context:
    """What every case needs: the workload, the settings and the device."""

    workload: Workload
    settings: Settings
    device: torch.device


@dataclass
class Result:
    """One row of the table.

    measured = numerator / denominator (median over repetitions); target None = reported
    only. unit: "s" (seconds per call) or "bytes" (peak). samples: per-repetition ratios.
    """

    id: str
    ratio: str
    measured: float
    target: float | None
    workload: str
    timed: str
    notes: str
    numerator: float
    denominator: float
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.measured <= self.target

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["met"] = self.met
        return data


def _timed_row(
    ctx: Context,
    id_: str,
    ratio: str,
    target: float | None,
    numerator: Callable[[], object],
    denominator: Callable[[], object],
    timed: str,
    notes: str,
) -> Result:
    s = ctx.settings
    timing = paired_ratio(
        numerator,
        denominator,
        device=ctx.device,
        repeats=s.repeats,
        warmup=s.warmup,
        min_block_s=s.min_block_s,
        clock=s.clock,
    )
    spread = f"per-repeat ratios {min(timing.ratios):.3f}..{max(timing.ratios):.3f}"
    return Result(
        id=id_,
        ratio=ratio,
        measured=timing.ratio,
        target=target,
        workload=ctx.workload.name,
        timed=timed,
        notes=f"{notes}; {_ms(timing.numerator_s)} vs {_ms(timing.denominator_s)}; {spread}",
        numerator=timing.numerator_s,
        denominator=timing.denominator_s,
        unit="s",
        samples=list(timing.ratios),
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _solver(cls: type[Solver], threshold: int) -> Solver:
    """``cls`` running every one of its ``threshold`` iterates (tol=0)."""
    return cls(threshold=threshold, tol=0.0)


def _full_run_note(deq: DEQ, threshold: int) -> str:
    """Whether the last forward solve of ``deq`` ran all ``threshold`` iterates per sample."""
    trajectory = deq.last_trajectory
    if trajectory is None:
        return "no solve recorded"
    if int(trajectory.steps.min()) == threshold:
        return f"all {threshold} iterates ran"
    return f"WARNING: some samples stopped after {int(trajectory.steps.min())} iterates"


def _estimator(
    ctx: Context,
    deq: DEQ,
    estimate: GradientEstimate | None = None,
    defense: Readout | None = None,
) -> DEQEstimator:
    return DEQEstimator(
        deq,
        input_shape=ctx.workload.input_shape,
        nb_classes=ctx.workload.num_classes,
        estimate=estimate,
        defense=defense,
        clip_values=(0.0, 1.0),
        device_type="gpu" if ctx.device.type == "cuda" else "cpu",
    )


def _one_hot(y: Tensor, classes: int) -> Tensor:
    return nn.functional.one_hot(y, classes).to(torch.float32)


def _loss_gradient(
    estimator: DEQEstimator, estimate: GradientEstimate, x: Tensor, y: Tensor
) -> Callable[[], object]:
    """A call of ``estimator.loss_gradient(x, y)`` with ``estimate`` selected."""

    def call() -> object:
        with estimator.using(estimate=estimate):
            return estimator.loss_gradient(x, y)

    return call


def gradient_estimates(ctx: Context) -> list[Result]:
    """Ensemble / single-step estimates, and adjoint(n) / unrolled(n, k=1), by loss_gradient."""
    n = ctx.settings.threshold
    deq = ctx.workload.model(ctx.device, solver=_solver(Broyden, n))
    x, y = ctx.workload.batch_data(ctx.device)
    y1 = _one_hot(y, ctx.workload.num_classes)
    est = _estimator(ctx, deq)

    def grad(estimate: GradientEstimate) -> Callable[[], object]:
        return _loss_gradient(est, estimate, x, y1)

    grad(Adjoint())()
    full = _full_run_note(deq, n)
    how = f"DEQEstimator.loss_gradient (ART entry point), Broyden({n} iterates), batch {len(x)}"
    return [
        _timed_row(
            ctx,
            "ensemble_adjoint",
            "GradientEnsemble(Adjoint) / Adjoint(n=N)",
            1.5,
            grad(GradientEnsemble(Adjoint())),
            grad(Adjoint(n=n)),
            f"{how}; ensemble over all N={n} states vs the estimate at z_N",
            f"naive ensemble (one estimate per state) would be ~N={n}; {full}",
        ),
        _timed_row(
            ctx,
            "ensemble_unrolled",
            "GradientEnsemble(Unrolled(k=1)) / Unrolled(n=N, k=1)",
            None,
            grad(GradientEnsemble(Unrolled(k=1))),
            grad(Unrolled(n=n, k=1)),
            f"{how}; one k=1 unrolling per state vs one at z_N",
            f"reported only: its naive cost is N={n} unrollings (shared forward solve); {full}",
        ),
        _timed_row(
            ctx,
            "adjoint_vs_unrolled",
            "Adjoint(n) / Unrolled(n, k=1)",
            1.15,
            grad(Adjoint(n=n)),
            grad(Unrolled(n=n, k=1)),
            f"{how}; n=N={n}",
            f"paper App. F.2: 1.21 (PGD-10 on DEQ-Large); {full}",
        ),
    ]


def plain_pgd(
    deq: DEQ, estimate: GradientEstimate, x: Tensor, y: Tensor, steps: int, loss: nn.Module
) -> Tensor:
    """L-inf PGD (eps 8/255, step 2/255, uniform random start) by ``estimate``, in plain torch."""
    cotangent = loss_cotangent(loss, y)
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = input_gradient(deq, estimate, x_adv, cotangent)
        x_adv = torch.minimum(torch.maximum(x_adv + EPS_STEP * grad.sign(), x - EPS), x + EPS)
        x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv


def art_pgd(ctx: Context) -> list[Result]:
    """ART's ProjectedGradientDescent through DEQEstimator / the same PGD in plain torch."""
    from art.attacks.evasion import ProjectedGradientDescent

    s = ctx.settings
    n = s.threshold
    deq = ctx.workload.model(ctx.device, solver=_solver(Broyden, n))
    x, y = ctx.workload.batch_data(ctx.device)
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
    loss = nn.CrossEntropyLoss()
    rows = []
    for id_, label, estimate in (
        ("art_pgd_unrolled", "Unrolled(k=1)", Unrolled(k=1)),
        ("art_pgd_adjoint", "Adjoint(beta=0.5)", Adjoint()),
    ):
        est = _estimator(ctx, deq, estimate=estimate)
        attack = ProjectedGradientDescent(
            est,
            norm=np.inf,
            eps=EPS,
            eps_step=EPS_STEP,
            max_iter=s.pgd_steps,
            num_random_init=1,
            batch_size=len(x_np),
            verbose=False,
        )

        def art_call(attack: ProjectedGradientDescent = attack) -> object:
            return attack.generate(x_np, y_np)

        def plain_call(estimate: GradientEstimate = estimate) -> object:
            return plain_pgd(deq, estimate, x, y, s.pgd_steps, loss)

        rows.append(
            _timed_row(
                ctx,
                id_,
                f"ART PGD-{s.pgd_steps} / plain torch PGD-{s.pgd_steps}, {label} at z_N",
                1.2,
                art_call,
                plain_call,
                f"ProjectedGradientDescent(eps 8/255, step 2/255, {s.pgd_steps} steps, random "
                f"start).generate on numpy vs a torch loop of input_gradient with the same "
                f"estimate; Broyden({n}), batch {len(x)}",
                "ART adds per step the defended logits (Final: one f step + head + loss) and "
                "after the attack two predicts for its success-rate log",
            )
        )
    return rows


def broyden_vs_torchdeq(ctx: Context) -> list[Result]:
    """Our Broyden solve / torchdeq 0.1.0's broyden_solver on the same f, batch, iterations."""
    from torchdeq.solver import get_solver

    n = ctx.settings.threshold
    deq = ctx.workload.model(ctx.device)
    x, _ = ctx.workload.batch_data(ctx.device)
    with torch.no_grad():
        injection = deq.inject(x)
        z0 = deq.initial_state(injection).reshape(len(x), -1)
    calls = [0]

    def fn(z: Tensor) -> Tensor:
        calls[0] += 1
        return deq.step(z, injection)

    ours = _solver(Broyden, n)
    torchdeq_broyden = get_solver("broyden")

    def ours_call() -> Tensor:
        return ours.solve(fn, z0).final

    def torchdeq_call() -> Tensor:
        with torch.no_grad():
            z_star, _, _ = torchdeq_broyden(fn, z0, max_iter=n, tol=0.0, stop_mode="rel")
        return z_star

    calls[0] = 0
    ours_final = ours_call()
    ours_nfe = calls[0]
    calls[0] = 0
    theirs_final = torchdeq_call()
    theirs_nfe = calls[0]
    diff = float((ours_final - theirs_final).norm() / theirs_final.norm().clamp(min=1e-30))
    return [
        _timed_row(
            ctx,
            "broyden_vs_torchdeq",
            "our Broyden / torchdeq 0.1.0 broyden_solver",
            1.0,
            ours_call,
            torchdeq_call,
            f"Broyden(threshold={n}, tol=0).solve vs torchdeq broyden_solver(max_iter={n}, "
            f"tol=0, stop_mode='rel', no line search) on the same flat f (B, d), batch {len(x)}",
            f"f evaluations {ours_nfe} vs {theirs_nfe}; answers differ by {diff:.1e} (relative); "
            "ours also keeps per-sample residuals, stopping, divergence and the B_n factors",
        )
    ]


def defense_memory(ctx: Context) -> list[Result]:
    """Peak memory of predict with the early and ensemble defenses, long / short solve; and,
    at the long solve, each defense / the final-state readout (the comparison of Table 13)."""
    s = ctx.settings
    short, long = s.threshold, s.long_threshold
    early = Early(n=max(1, short // 2))
    deq = ctx.workload.model(ctx.device)
    x, _ = ctx.workload.batch_data(ctx.device)
    x_np = x.cpu().numpy()
    repeats = max(1, min(s.repeats, 3))

    def peak(cls: type[Solver], threshold: int, defense: Readout) -> int:
        deq.solver = _solver(cls, threshold)
        est = _estimator(ctx, deq, defense=defense)

        def call() -> object:
            return est.predict(x_np, batch_size=len(x_np))

        call()
        return int(statistics.median(peak_bytes(call, ctx.device) for _ in range(repeats)))

    how = f"DEQEstimator.predict (no grad) of batch {len(x_np)}"
    kinds: tuple[tuple[type[Solver], str], ...] = (
        (
            Broyden,
            "keeps its factors U (B,d,N) and V (B,N,d): every step applies B_n, built "
            "from all earlier updates, and the adjoint estimates reuse them, so its memory "
            "grows with N whatever the defense",
        ),
        (Anderson, "keeps a fixed window of memory=5 iterates: O(1) in N"),
        (FixedPointIteration, "keeps only the current iterate: O(1) in N"),
    )
    rows = []
    long_broyden: dict[str, int] = {}
    for cls, why in kinds:
        for defense in (early, Ensemble()):
            name = defense.__class__.__name__
            peaks = {threshold: peak(cls, threshold, defense) for threshold in (long, short)}
            if cls is Broyden:
                long_broyden[name] = peaks[long]
            rows.append(
                Result(
                    id=f"memory_{name.lower()}_{cls.__name__.lower()}",
                    ratio=f"peak memory, {defense!r}, {cls.__name__}: {long} / {short} iterates",
                    measured=peaks[long] / peaks[short],
                    target=1.1,
                    workload=ctx.workload.name,
                    timed=f"{how}, {cls.__name__}(threshold={long} vs {short}, tol=0)",
                    notes=f"{_mib(peaks[long])} vs {_mib(peaks[short])}; {cls.__name__} {why}",
                    numerator=float(peaks[long]),
                    denominator=float(peaks[short]),
                    unit="bytes",
                )
            )
    final = peak(Broyden, long, Final())
    for defense in (early, Ensemble()):
        name = defense.__class__.__name__
        rows.append(
            Result(
                id=f"memory_{name.lower()}_vs_final",
                ratio=f"peak memory, {defense!r} / Final(), Broyden, {long} iterates",
                measured=long_broyden[name] / final,
                target=None,
                workload=ctx.workload.name,
                timed=f"{how}, Broyden(threshold={long}, tol=0), defense vs final-state readout",
                notes=f"reported only: what the defense itself adds (Table 13: Final, Early and "
                f"Ensemble all 3.77 GB); {_mib(long_broyden[name])} vs {_mib(final)}",
                numerator=float(long_broyden[name]),
                denominator=float(final),
                unit="bytes",
            )
        )
    deq.solver = _solver(Broyden, short)
    return rows


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def training_step(ctx: Context) -> list[Result]:
    """One optimizer step with the phantom training gradient / with the exact one."""
    s = ctx.settings
    n = s.threshold
    x, y = ctx.workload.batch_data(ctx.device)
    backward_solves: list[Trajectory] = []
    phantom = ctx.workload.model(
        ctx.device,
        solver=_solver(Broyden, n),
        training_gradient=PhantomGradient(k=s.phantom_k, lam=s.phantom_lam),
    )
    exact = ctx.workload.model(
        ctx.device,
        solver=_solver(Broyden, n),
        training_gradient=ImplicitGradient(
            backward_solver=_solver(Broyden, s.backward_threshold),
            on_backward=backward_solves.append,
        ),
    )

    def step_of(deq: DEQ) -> Callable[[], object]:
        optimizer = torch.optim.Adam(deq.parameters(), lr=1e-3)

        def step() -> object:
            deq.train()
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(deq(x), y)
            loss.backward()
            optimizer.step()
            return loss

        return step

    phantom_step, exact_step = step_of(phantom), step_of(exact)
    exact_step()
    backward_note = (
        f"exact backward ran {backward_solves[-1].num_steps} iterates" if backward_solves else ""
    )
    return [
        _timed_row(
            ctx,
            "train_phantom_vs_exact",
            f"phantom ({n} forward, k={s.phantom_k}) / exact ({n}/{s.backward_threshold}) "
            "training step",
            0.85,
            phantom_step,
            exact_step,
            f"Adam step (forward + backward + step) on batch {len(x)}: PhantomGradient(k="
            f"{s.phantom_k}, lam={s.phantom_lam}) vs ImplicitGradient(Broyden(threshold="
            f"{s.backward_threshold}, tol=0)), both Broyden({n}, tol=0) forward",
            f"paper Table 10: 28.3/35.4 samples/s = 0.80; {_full_run_note(exact, n)}; "
            f"{backward_note}",
        )
    ]


def through_solver(ctx: Context) -> list[Result]:
    """Backprop through the solver (plain and checkpointed) against Unrolled(n=N, k=1) and
    Adjoint(n=N), by loss_gradient: time and peak memory."""
    n = ctx.settings.threshold
    deq = ctx.workload.model(ctx.device, solver=_solver(Broyden, n))
    x, y = ctx.workload.batch_data(ctx.device)
    y1 = _one_hot(y, ctx.workload.num_classes)
    est = _estimator(ctx, deq)
    bptt, recomputed = BackpropThroughSolver(), BackpropThroughSolver(checkpoint=True)
    unrolled, adjoint = Unrolled(n=n, k=1), Adjoint(n=n)

    def grad(estimate: GradientEstimate) -> Callable[[], object]:
        return _loss_gradient(est, estimate, x, y1)

    grad(bptt)()
    full = _full_run_note(deq, n)
    how = f"DEQEstimator.loss_gradient, Broyden({n} iterates, tol=0), batch {len(x)}"
    rows = [
        _timed_row(
            ctx,
            id_,
            f"BackpropThroughSolver({label}) / {other}",
            None,
            grad(numerator),
            grad(denominator),
            f"{how}; the forward solve again with autograd, then one backward through its "
            f"{n} steps, vs the estimate at z_N",
            f"reported only; {full}",
        )
        for id_, label, numerator, other, denominator in (
            ("bptt_vs_unrolled", "", bptt, f"Unrolled(n={n}, k=1)", unrolled),
            ("bptt_vs_adjoint", "", bptt, f"Adjoint(n={n})", adjoint),
            (
                "bptt_checkpoint_vs_unrolled",
                "checkpoint=True",
                recomputed,
                f"Unrolled(n={n}, k=1)",
                unrolled,
            ),
        )
    ]
    repeats = max(1, min(ctx.settings.repeats, 3))

    def peak(estimate: GradientEstimate) -> int:
        call = grad(estimate)
        call()
        return int(statistics.median(peak_bytes(call, ctx.device) for _ in range(repeats)))

    base = peak(unrolled)
    for name, label, estimate, why in (
        ("bptt", "BackpropThroughSolver()", bptt, "keeps every step's activations: O(N)"),
        (
            "bptt_checkpoint",
            "BackpropThroughSolver(checkpoint=True)",
            recomputed,
            "keeps the solver's own states per step, recomputes f's activations",
        ),
        ("adjoint", f"Adjoint(n={n})", adjoint, "keeps Broyden's factors and u_m"),
    ):
        value = peak(estimate)
        rows.append(
            Result(
                id=f"memory_{name}_vs_unrolled",
                ratio=f"peak memory, {label} / Unrolled(n={n}, k=1)",
                measured=value / base,
                target=None,
                workload=ctx.workload.name,
                timed=f"{how}: one call each",
                notes=f"reported only: {_mib(value)} vs {_mib(base)}; {why}",
                numerator=float(value),
                denominator=float(base),
                unit="bytes",
            )
        )
    return rows
def pgd_at_throughput(ctx: Context) -> list[Result]:
    """One PGD-AT step of the training loop (ART's PGD with the training gradient in eval mode,
    then the training step) with the phantom gradient / with the exact one."""
    s = ctx.settings
    n = s.threshold
    x, y = ctx.workload.batch_data(ctx.device)
    gradients = {
        "phantom": PhantomGradient(k=s.phantom_k, lam=s.phantom_lam),
        "exact": ImplicitGradient(backward_solver=_solver(Broyden, s.backward_threshold)),
    }
    steps = {}
    for name, gradient in gradients.items():
        deq = ctx.workload.model(ctx.device, solver=_solver(Broyden, n), training_gradient=gradient)
        optimizer, schedule = optimizer_and_schedule(deq, PAPER, total_steps=10_000)
        classifier = art_classifier(
            deq, ctx.workload.input_shape, ctx.workload.num_classes, ctx.device
        )
        attack = pgd_attack(classifier, EPS, EPS_STEP, s.pgd_steps, True, len(x))
        step_ctx = training_loop.StepContext(
            TrainingModule(deq, depth=n),
            deq,
            optimizer,
            schedule,
            attack,
            ctx.workload.num_classes,
            ctx.device,
            Acceleration(),
        )
        steps[name] = functools.partial(training_loop.training_step, step_ctx, x, y, True, False)
    row = _timed_row(
        ctx,
        "pgd_at_phantom_vs_exact",
        f"PGD-AT step: phantom (k={s.phantom_k}) / exact ({n}/{s.backward_threshold})",
        None,
        steps["phantom"],
        steps["exact"],
        f"deq_attacks.training.loop.training_step on batch {len(x)}: ART PGD-{s.pgd_steps} "
        "(random start, eval mode, the training gradient) then the Adam step",
        "paper Table 10 (DEQ-Large, batch 96, RTX 3090): phantom 35.4, exact (8/7) 28.3 "
        "samples/s, time ratio 0.80",
    )
    phantom_rate, exact_rate = len(x) / row.numerator, len(x) / row.denominator
    row.notes += f"; measured phantom {phantom_rate:.2f}, exact {exact_rate:.2f} samples/s"
    return [row]


def shared_runs(ctx: Context) -> list[Result]:
    """The PGD part of the evaluation matrix (4 estimates x 3 defenses x every state z_n) by
    shared runs / the sum of its distinct attack runs, and / today's cell-by-cell run."""
    from deq_attacks.evaluation import ThreatModel, fixed_step_pgd, score_readouts
    from deq_attacks.evaluation.distributed import Shards
    from deq_attacks.evaluation.shared_runs import shared_pgd_scores

    s = ctx.settings
    n = s.threshold
    deq = ctx.workload.model(ctx.device, solver=_solver(Broyden, n))
    est = _estimator(ctx, deq)
    xt, yt = ctx.workload.batch_data(ctx.device)
    x, y = xt.cpu().numpy(), yt.cpu().numpy()
    threat = ThreatModel(EPS, EPS_STEP, s.pgd_steps)
    estimates: list[GradientEstimate] = [
        Phantom(s.phantom_k, s.phantom_lam),
        Adjoint(n=min(3, n), beta=0.5),
        Unrolled(n=1, k=1, lam=1.0),
        GradientEnsemble(Adjoint(beta=0.5)),
    ]
    defenses: dict[str, Readout] = {
        "final": Final(),
        "early": Early(min(2, n)),
        "ensemble": Ensemble(),
    }
    shards = Shards(block_size=len(x))

    def matrix() -> None:
        for estimate in estimates:
            shared_pgd_scores(est, estimate, x, y, threat, defenses, shards)

    def distinct() -> None:
        for estimate in estimates:
            fixed_step_pgd(est, estimate, x, y, threat)

    def cell_by_cell() -> None:
        for name, readout in defenses.items():
            with est.using(defense=readout):
                for estimate in estimates:
                    x_adv = fixed_step_pgd(est, estimate, x, y, threat)
                    score_readouts(est, x_adv, y, {name: readout}, len(x))

    matrix()
    full = _full_run_note(deq, n)
    how = (
        f"PGD-{s.pgd_steps} with {len(estimates)} estimates (Phantom, Adjoint(n=3), "
        f"Unrolled(1,1,1), GradientEnsemble(Adjoint)), defenses final/early/ensemble, "
        f"Broyden({n} iterates), batch {len(x)}"
    )
    return [
        _timed_row(
            ctx,
            "shared_runs_vs_distinct",
            "whole PGD matrix by shared runs / sum of its distinct attack runs",
            1.1,
            matrix,
            distinct,
            f"{how}; the matrix scores every defense and every z_n of each run",
            f"the extra is one forward solve (all iterates kept) per run; {full}",
        ),
        _timed_row(
            ctx,
            "shared_runs_vs_cells",
            "whole PGD matrix by shared runs / cell-by-cell (one run per defense x estimate)",
            None,
            matrix,
            cell_by_cell,
            f"{how}; cell-by-cell reruns the attack for each defense",
            f"expected about 1/{len(defenses)} (the number of defenses); {full}",
        ),
    ]


CASES: tuple[Callable[[Context], list[Result]], ...] = (
    gradient_estimates,
    art_pgd,
    broyden_vs_torchdeq,
    defense_memory,
    training_step,
    through_solver,
    pgd_at_throughput,


    shared_runs,
)
