"""What a reviewer needs from the outputs of a run: results.md and results.tex state the
threat model, n, the mode, every budget as standard or reduced, the intervals and what was
not run; findings name no source file; the cascade's legend describes its own table; the
figures carry the model, data and split, norm and eps, as PNG and PDF."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from evaluation_fixtures import AA, TINY, splits, tiny_estimator
from matplotlib.figure import Figure

from deq_attacks.evaluation import EvaluationConfig, evaluate_model, write_outputs
from deq_attacks.evaluation.facts import budgets, standard
from deq_attacks.evaluation.settings import Mode

pytestmark = pytest.mark.filterwarnings("ignore::deq_attacks.deq.convergence.NotConvergedWarning")

ABOUT = {"model": "mlp_deq (tiny)", "data": "digits"}


def run(config: EvaluationConfig):
    dev, test = splits()
    return evaluate_model(tiny_estimator(trained=True), test, dev, config, description=ABOUT)


@pytest.fixture(scope="module")
def cascade():
    config = dataclasses.replace(TINY, mode=Mode.CASCADE, bptt=False, attacks=f"pgd,{AA}")
    return run(config)


def written(report, tmp_path: Path, monkeypatch) -> tuple[dict[str, Path], list[str]]:
    titles: list[str] = []
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        titles.append(fig._suptitle.get_text() if fig._suptitle is not None else "")
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return write_outputs(report, tmp_path, "White-box evaluation (digits, mlp_deq)"), titles


def test_cascade_outputs_state_what_a_reviewer_needs(cascade, tmp_path, monkeypatch) -> None:
    paths, titles = written(cascade, tmp_path, monkeypatch)
    text = paths["markdown"].read_text()
    assert "- Threat model: L-inf, eps 0.1, inputs in [0, 1]; PGD-2 with step 0.05" in text
    assert f"- Samples: {cascade.settings['n_test']} test images" in text
    assert "95% Wilson" in text and "- Mode: cascade" in text
    assert "AutoAttack APGD/FAB iterations: 2 (REDUCED)" in text
    assert "AutoAttack Square queries: 5 (REDUCED)" in text
    assert "**Not the standard evaluation**" in text
    assert "- Not run: the square column; backpropagation through the solver" in text
    assert "- Model: mlp_deq (tiny); data: digits." in text
    assert not re.search(r"\.py:\d+", text)  # findings in words, no source lines
    # the legend describes the cascade's own table, which has no attack columns
    assert "under each attack" not in text
    header = next(line for line in text.splitlines() if line.startswith("| defense"))
    assert header.count("|") == 5 and not any(c in header for c in cascade.columns)
    tex = paths["latex"].read_text()
    assert "\\begin{tabular}{lrr}" in tex and "\\toprule" in tex and "95\\% Wilson" in tex
    assert "Not the standard evaluation" in tex and "Mode: cascade" in tex
    assert "Not run: the square column" in tex and "mlp\\_deq (tiny) on digits" in tex
    rows = [line for line in tex.splitlines() if line.endswith("\\\\")]
    assert len(rows) == 1 + len(cascade.defenses) and all(r.count("&") == 2 for r in rows)
    for name in ("states", "sweep"):
        assert paths[name].suffix == ".png" and paths[name].stat().st_size > 0
        assert paths[f"{name}_pdf"].read_bytes().startswith(b"%PDF")
    n_test, n_dev = cascade.settings["n_test"], cascade.settings["n_development"]
    assert f"mlp_deq (tiny) on digits, test split (n={n_test}), L-inf eps=0.1" in titles
    assert f"mlp_deq (tiny) on digits, development split (n={n_dev}), L-inf eps=0.1" in titles


def test_standard_budgets_are_marked_standard(cascade) -> None:
    full = dataclasses.replace(cascade, settings={
        **cascade.settings,
        "config": {**cascade.settings["config"], "steps": 10, "long_steps": 100,
                   "attacks": "pgd,autoattack"},
    })  # fmt: skip
    assert all(b.standard for b in budgets(full))
    assert not standard(full)  # cascade mode, no Square column, no BPTT
    assert not standard(cascade)


def test_training_plot_marks_pretraining_and_pgd_at_with_its_eps(tmp_path, monkeypatch) -> None:
    from deq_attacks.training.plots import plot_history

    history = [
        {"epoch": e + 1, "phase": phase, "dev_clean_accuracy": 0.5, "dev_pgd_accuracy": 0.2,
         "samples_per_s": 100.0, "dev_residuals": [0.5, 0.1], "dev_spectral_radius": 0.7}
        for e, phase in enumerate(["pretrain", "pretrain", "pretrain+pgd-at", "pgd-at"])
    ]  # fmt: skip
    figures = []
    save = Figure.savefig

    def record(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    plot_history(history, tmp_path / "training.png", eps=0.1, title="small_conv_deq on digits")
    (fig,) = figures
    assert fig._suptitle.get_text() == (
        "small_conv_deq on digits: clean pretraining, then PGD-AT at L-inf eps=0.1"
    )
    accuracy = fig.axes[0]
    labels = accuracy.get_legend_handles_labels()[1]
    assert "clean pretraining" in labels and "PGD-AT, L-inf eps=0.1 from here" in labels
    (span,) = [p for p in accuracy.patches if p.get_label() == "clean pretraining"]
    assert span.get_x() == pytest.approx(0.5) and span.get_width() == pytest.approx(2.0)
    start = next(line for line in accuracy.lines if line.get_label().startswith("PGD-AT"))
    assert start.get_xdata()[0] == pytest.approx(2.5)
