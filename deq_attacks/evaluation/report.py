"""Readable tables and plots of an evaluation result."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from deq_attacks.evaluation.protocol import EvaluationResult


def markdown_table(result: EvaluationResult, attack_labels: Sequence[str]) -> str:
    """Rows: defenses; columns: clean, each attack, worst case. Bold: the white-box robustness."""
    worst = result.worst_case()
    best, _ = result.white_box_robustness()
    header = ["defense", "clean", *attack_labels, "worst case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for defense, cells in result.robust.items():
        values = [f"{100 * cells[a]:.1f}" if a in cells else "-" for a in attack_labels]
        worst_cell = f"{100 * worst[defense]:.1f}"
        if defense == best:
            worst_cell = f"**{worst_cell}**"
        label = defense if defense != "early" else f"early (z_{result.early_exit})"
        clean = f"{100 * result.clean.get(defense, float('nan')):.1f}"
        lines.append("| " + " | ".join([label, clean, *values, worst_cell]) + " |")
    return "\n".join(lines)


def plot_states(result: EvaluationResult, path: Path) -> Path | None:
    """Clean and ready-made-attack accuracy, and residual, of every iterate (Fig. 2)."""
    dev = result.development
    if not dev:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(dev["clean_accuracy_per_state"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(steps, [100 * v for v in dev["clean_accuracy_per_state"]], "o-", label="clean")
    left.plot(steps, [100 * v for v in dev["pgd_accuracy_per_state"]], "s-", label="ready-made PGD")
    left.set_xlabel("iterate n")
    left.set_ylabel("accuracy of z_n (%)")
    left.legend()
    right.semilogy(steps, dev["residual_per_state"], "o-")
    right.axhline(0.05, color="gray", linestyle="--", label="0.05")
    right.set_xlabel("iterate n")
    right.set_ylabel("relative residual")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
