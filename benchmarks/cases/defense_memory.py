"""Peak memory of predict with the early and ensemble defenses, long against short solve, and
at the long solve each defense against the final-state readout (the comparison of Table 13)."""

from __future__ import annotations

from benchmarks.cases.common import (
    Bounds,
    Context,
    Result,
    Row,
    estimator,
    full_solver,
    median_peak,
    mib,
)
from deq_attacks import Anderson, Broyden, Early, Ensemble, Final, FixedPointIteration, Readout
from deq_attacks.solvers import Solver

BOUNDS: Bounds = (
    (
        (
            "memory_early_broyden",
            "memory_ensemble_broyden",
            "memory_early_anderson",
            "memory_ensemble_anderson",
            "memory_early_fixedpointiteration",
            "memory_ensemble_fixedpointiteration",
        ),
        "Broyden's iteration applies B_n, whose factors hold one pair of (B, d) vectors per "
        "step, so the solver itself is O(N) in memory; Early(n) stops the solve after n "
        "iterates, so its memory does not grow with the threshold, while the ensemble runs all "
        "N. The defenses add O(1) on top (the vs-Final rows). Anderson (its window) and "
        "fixed-point iteration are O(1); where a longer solve's lowest-residual iterate is an "
        "earlier one, it is kept as one more (B, d) row, which the short solve (every iterate "
        "better than the last) does not need: at batch 64 that row is 1 MiB of about 10.",
    ),
)


def run(ctx: Context) -> list[Row]:
    s = ctx.settings
    short, long = s.threshold, s.long_threshold
    early = Early(n=max(1, short // 2))
    deq = ctx.workload.model(ctx.device)
    x, _ = ctx.workload.batch_data(ctx.device)
    x_np = x.cpu().numpy()

    def peak(cls: type[Solver], threshold: int, defense: Readout) -> int:
        deq.solver = full_solver(cls, threshold)
        est = estimator(ctx, deq, defense=defense)
        return median_peak(ctx, lambda: est.predict(x_np, batch_size=len(x_np)))

    how = f"DEQEstimator.predict (no grad) of batch {len(x_np)}"
    kinds: tuple[tuple[type[Solver], str], ...] = (
        (
            Broyden,
            "keeps its factors U (B,d,N) and V (B,N,d): every step applies B_n, built from "
            "all earlier updates, and the adjoint estimates reuse them, so its memory grows "
            "with the iterates it runs (Early(n) runs n of them)",
        ),
        (Anderson, "keeps a fixed window of memory=5 iterates: O(1) in N"),
        (FixedPointIteration, "keeps only the current iterate: O(1) in N"),
    )
    rows: list[Row] = []
    long_broyden: dict[str, int] = {}
    for cls, why in kinds:
        for defense in (early, Ensemble()):
            name = defense.__class__.__name__
            peaks = {threshold: peak(cls, threshold, defense) for threshold in (long, short)}
            if cls is Broyden:
                long_broyden[name] = peaks[long]
            target = None if cls is Broyden and isinstance(defense, Ensemble) else 1.1
            rows.append(
                Result(
                    id=f"memory_{name.lower()}_{cls.__name__.lower()}",
                    ratio=f"peak memory, {defense!r}, {cls.__name__}: {long} / {short} iterates",
                    measured=peaks[long] / peaks[short],
                    target=target,
                    workload=ctx.workload.name,
                    timed=f"{how}, {cls.__name__}(threshold={long} vs {short}, tol=0)",
                    notes=(
                        ("reported only: O(N) by design; " if target is None else "")
                        + f"{mib(peaks[long])} vs {mib(peaks[short])}; {cls.__name__} {why}"
                    ),
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
                f"Ensemble all 3.77 GB); {mib(long_broyden[name])} vs {mib(final)}",
                numerator=float(long_broyden[name]),
                denominator=float(final),
                unit="bytes",
            )
        )
    deq.solver = full_solver(Broyden, short)
    return rows
