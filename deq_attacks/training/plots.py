"""``training.png``: the per-epoch traces of a run, drawn from its metrics history."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mark_phases(ax: Any, history: list[dict[str, Any]], eps: float | None) -> None:
    """Shade the clean-pretraining epochs and draw where PGD-AT starts (with its eps)."""
    pre = [r["epoch"] for r in history if r.get("phase") == "pretrain"]
    if pre:
        ax.axvspan(min(pre) - 0.5, max(pre) + 0.5, color="0.9", label="clean pretraining")
    adversarial = [r["epoch"] for r in history if "pgd-at" in str(r.get("phase", ""))]
    if adversarial:
        text = "PGD-AT" if eps is None else f"PGD-AT, L-inf eps={eps:.4g}"
        start = min(adversarial) - 0.5
        ax.axvline(start, color="tab:red", linestyle="--", label=f"{text} from here")


def plot_history(
    history: list[dict[str, Any]], path: Path, eps: float | None = None, title: str = ""
) -> Path:
    """Four panels: dev clean / PGD accuracy, mean relative residual per state (one line per
    epoch, late epochs darker), spectral radius of J_f at z*, training samples per second.
    The epoch panels shade clean pretraining and mark where PGD-AT (at ``eps``) starts; the
    figure is titled ``title`` and the training's phases."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(11, 8))
    phases = "clean pretraining, then PGD-AT" + ("" if eps is None else f" at L-inf eps={eps:.4g}")
    fig.suptitle(f"{title}: {phases}" if title else phases, fontsize=10)
    axes = fig.subplots(2, 2)
    ax = axes[0][0]
    ax.plot(epochs, [100 * r["dev_clean_accuracy"] for r in history], "o-", label="clean")
    ax.plot(epochs, [100 * r["dev_pgd_accuracy"] for r in history], "s-", label="PGD (dev)")
    ax.set(xlabel="epoch", ylabel="dev accuracy (%)", title="development split")
    _mark_phases(ax, history, eps)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    with_residuals = [r for r in history if "dev_residuals" in r]
    for i, r in enumerate(with_residuals):
        shade = 0.25 + 0.75 * (i + 1) / len(with_residuals)
        states = range(1, len(r["dev_residuals"]) + 1)
        ax.semilogy(states, r["dev_residuals"], color=(0, 0, shade), label=f"epoch {r['epoch']}")
    ax.axhline(0.05, color="gray", linestyle=":", label="0.05")
    ax.set(xlabel="state n", ylabel="mean relative residual", title="fixed-point residual (dev)")
    if with_residuals:
        ax.legend(fontsize=7, ncol=2)
    ax = axes[1][0]
    radii = [(r["epoch"], r["dev_spectral_radius"]) for r in history if "dev_spectral_radius" in r]
    if radii:
        ax.plot(*zip(*radii, strict=True), "o-")
    ax.set(xlabel="epoch", ylabel="spectral radius of J_f(z*)", title="stability (dev)")
    _mark_phases(ax, history, eps)
    ax = axes[1][1]
    ax.plot(epochs, [r["samples_per_s"] for r in history], "o-")
    ax.set(xlabel="epoch", ylabel="training samples / s", title="throughput")
    _mark_phases(ax, history, eps)
    fig.subplots_adjust(hspace=0.35, wspace=0.3)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
    return path
