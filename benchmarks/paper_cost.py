"""The cost of the protocol at the paper's scale, from the cost model (``deq_attacks.evaluation.
cost``): f evaluations per test image in table, cascade and verdict mode under the
``cifar10_paper`` preset on DEQ-Large (exact 8/7: Broyden 8 forward, 7 backward iterates),
10,000 test and 100 development images, robust accuracy 40-60%, turned into H100 hours with
the PGD-AT throughput of docs/gpu_runs.md.

    python -m benchmarks.paper_cost
"""

from __future__ import annotations

from deq_attacks.evaluation.attacks import FixedStepPGD, Square, StandardAutoAttack
from deq_attacks.evaluation.cost import mode_costs
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.evaluation.threat import ThreatModel

N, BACKWARD, CLASSES, STEPS = 8, 7, 10, 10
N_TEST, N_DEV = 10_000, 100
#: PGD-AT on DEQ-Large exact 8/7 on one H100 (docs/gpu_runs.md): 51.0 samples/s, each sample
#: PGD-10 (10 gradients) and one training step, every gradient a forward solve and a backward
#: solve of f.
PGD_AT_SAMPLES_PER_S = 51.0
F_PER_S = PGD_AT_SAMPLES_PER_S * (STEPS + 1) * (N + BACKWARD)

#: f evaluations per sample of one gradient with each column's estimate: the forward solve (N)
#: and the backward (Exact: BACKWARD VJPs and one; Adjoint(n=N): a VJP and an f per step;
#: Unrolled(k=5): 5 steps and their VJPs; the ensembles: every n; BPTT: a VJP per step).
GRADIENT = {
    "ready-made (exact)": N + BACKWARD + 1,
    "adjoint z_n": N + 2 * N,
    "unrolled z_n": N + 2 * 5,
    "ens. adjoint": N + 2 * N,
    "ens. unrolled": N + 2 * N,
    "bptt": 2 * N,
}


def per_defense_columns() -> list[float]:
    """Per-sample f evaluations of the per-defense columns, strongest first (BPTT AutoAttack,
    then the other estimates' AutoAttack, Square, BPTT PGD), each with its scoring forward."""
    threat = ThreatModel(8 / 255, 2 / 255, STEPS)
    autoattack = StandardAutoAttack()
    forwards, gradients = autoattack.calls(threat, CLASSES)
    columns = [(forwards + 1) * N + gradients * GRADIENT["bptt"]]
    columns += [(forwards + 1) * N + gradients * g for k, g in GRADIENT.items() if k != "bptt"]
    square_forwards, _ = Square(5000).calls(threat, CLASSES)
    columns.append((square_forwards + 1) * N)
    columns.append(N + STEPS * GRADIENT["bptt"])  # BPTT's PGD runs per defense
    return columns


def shared_pgd() -> float:
    """Per-sample f evaluations of the shared PGD columns (one run for every defense)."""
    _, gradients = FixedStepPGD().calls(ThreatModel(8 / 255, 2 / 255, STEPS), CLASSES)
    return sum(N + gradients * g for k, g in GRADIENT.items() if k != "bptt")


def paper_scale(robust: float) -> dict[str, float]:
    """f evaluations per test image of each mode's columns (3 defenses, the shared PGD on
    every image), the strongest column (BPTT AutoAttack) keeping every break."""
    cover = EvaluationConfig().cover_size
    per_defense = mode_costs(per_defense_columns(), N_TEST, N_DEV, robust, kept=1, cover=cover)
    shared = shared_pgd()
    return {mode: shared + 3 * value / N_TEST for mode, value in per_defense.items()}


def markdown() -> str:
    """The cost model's section of docs/benchmarks.md (computed, never typed in)."""
    lines = [
        "## The protocol's cost at the paper's scale (cost model)",
        "",
        "Computed by `python -m benchmarks.paper_cost` from the cost model "
        "(`deq_attacks.evaluation.cost.mode_costs`, the attacks' `calls`), not measured: the "
        f"`cifar10_paper` preset on DEQ-Large (exact 8/7: {N} forward, {BACKWARD} backward "
        f"Broyden iterates), {N_TEST:,} test and {N_DEV} development images, 3 defenses, 7 "
        "estimates (ready-made, Exact, the chosen adjoint and unrolled, their ensembles, "
        "BPTT) with PGD-10 and the standard AutoAttack, and Square (5,000 queries). Per "
        "gradient: the forward solve and the estimate's backward (Exact "
        f"{GRADIENT['ready-made (exact)']}, Adjoint(n=8) {GRADIENT['adjoint z_n']}, Unrolled(k=5) "
        f"{GRADIENT['unrolled z_n']}, BPTT {GRADIENT['bptt']} f evaluations per sample). "
        "Every column is charged its whole budget on a sample that survives it and nothing "
        "on one an earlier column broke; verdict mode keeps the strongest column (BPTT "
        "AutoAttack) and the shared PGD runs, pays the cover on its default "
        f"`cover_size` ({EvaluationConfig().cover_size}) development images and audits 59 "
        "survivors per defense. H100 hours use the PGD-AT throughput of "
        f"[gpu_runs.md](gpu_runs.md): {PGD_AT_SAMPLES_PER_S} samples/s for exact 8/7, each "
        f"sample {STEPS + 1} gradients of {N + BACKWARD} f evaluations: {F_PER_S:,.0f} f "
        "evaluations per second (batch 96; an attack's smaller batches of survivors run "
        "slower).",
        "",
        "| robust accuracy | mode | f evaluations per test image | / table "
        "| H100 hours (10,000 images) |",
        "|---|---|---|---|---|",
    ]
    for robust in (0.4, 0.6):
        costs = paper_scale(robust)
        for mode, value in costs.items():
            hours = value * N_TEST / F_PER_S / 3600
            lines.append(
                f"| {robust:.0%} | {mode} | {value:,.0f} | {value / costs['table']:.2f} | "
                f"{hours:,.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    print(markdown())


if __name__ == "__main__":
    main()
