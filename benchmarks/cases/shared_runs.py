"""The PGD part of the evaluation matrix (4 estimates x 3 defenses x every state z_n) by shared
runs against the sum of its distinct attack runs, and against a cell-by-cell run."""

from __future__ import annotations

from benchmarks.cases.common import (
    EPS,
    EPS_STEP,
    Bounds,
    Context,
    Row,
    estimator,
    full_run_note,
    full_solver,
    timed_row,
)
from deq_attacks import (
    Adjoint,
    Broyden,
    Early,
    Ensemble,
    Final,
    GradientEnsemble,
    GradientEstimate,
    Phantom,
    Readout,
    Unrolled,
)

BOUNDS: Bounds = (
    (
        ("shared_runs_vs_distinct", "shared_runs_vs_cells"),
        "A fixed-step PGD with a loss-aware estimate never looks at the defended output, so one "
        "run per estimate yields the adversarial examples of every defense and every state z_n; "
        "scoring them costs one forward solve that keeps every iterate. Cell by cell, the "
        "attack is rerun for each defense.",
    ),
)


def run(ctx: Context) -> list[Row]:
    from deq_attacks.evaluation import ThreatModel, fixed_step_pgd, score_readouts
    from deq_attacks.evaluation.distributed import Shards
    from deq_attacks.evaluation.shared_runs import shared_pgd_scores

    s = ctx.settings
    n = s.threshold
    deq = ctx.workload.model(ctx.device, solver=full_solver(Broyden, n))
    est = estimator(ctx, deq)
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
    full = full_run_note(deq, n)
    how = (
        f"PGD-{s.pgd_steps} with {len(estimates)} estimates (Phantom, Adjoint(n=3), "
        f"Unrolled(1,1,1), GradientEnsemble(Adjoint)), defenses final/early/ensemble, "
        f"Broyden({n} iterates), batch {len(x)}"
    )
    return [
        timed_row(
            ctx,
            "shared_runs_vs_distinct",
            "whole PGD matrix by shared runs / sum of its distinct attack runs",
            1.1,
            matrix,
            distinct,
            f"{how}; the matrix scores every defense and every z_n of each run",
            f"the extra is one forward solve (all iterates kept) per run; {full}",
        ),
        timed_row(
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
