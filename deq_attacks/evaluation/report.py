"""Readable output of an evaluation: a markdown table laid out like Table 2/3, the
diagnostics with their verdicts, and PNG plots (iterates: Fig. 2; sweep: Fig. 3/4); and, for
tables of one's own (rows of numbers, e.g. from ``column_scores``), ``markdown_rows`` and
``write_tables`` (``results.json`` + ``results.md``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deq_attacks.evaluation import entropy_defense, facts
from deq_attacks.evaluation.latex import latex_table
from deq_attacks.evaluation.result import EvaluationReport
from deq_attacks.evaluation.store import jsonable
from deq_attacks.records import plain


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(report: EvaluationReport) -> str:
    """Table mode: rows: defenses; columns: clean, every attack column, the paper's worst case
    (min over columns of the mean) and the per-sample worst case with its 95% Wilson interval.
    Cascade mode: ``cascade_table``."""
    if report.mode != "table":
        return cascade_table(report)
    matrix = report.matrix()
    accuracy = matrix.column_accuracy()
    paper, per_sample = matrix.paper_worst(), matrix.per_sample_worst()
    best_paper = max(range(len(paper)), key=lambda i: paper[i].robust)
    best_sample = max(range(len(per_sample)), key=lambda i: per_sample[i].robust)
    header = ["defense", "clean", *matrix.columns, "worst (paper)", "worst per sample [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d, name in enumerate(matrix.defenses):
        label = name if name != "early" else f"early (z_{report.early_exit})"
        worst = _pct(paper[d].accuracy)
        sample = str(per_sample[d])
        if d == best_paper:
            worst = f"**{worst}**"
        if d == best_sample:
            sample = f"**{sample}**"
        clean = _pct(float(matrix.clean[d].mean()))
        cells = [_pct(v) for v in accuracy[d]]
        lines.append("| " + " | ".join([label, clean, *cells, worst, sample]) + " |")
    return "\n".join(lines)


def cascade_table(report: EvaluationReport) -> str:
    """Cascade mode: per defense, clean accuracy, the per-sample robust accuracy with its 95%
    Wilson interval, and how many samples each column broke first, in run order."""
    lines = [
        "| defense | clean | robust per sample [95% CI] | broken first by (run order) |",
        "|---|---|---|---|",
    ]
    robustness = {r.defense: r for r in report.robustness()}
    best = max(robustness.values(), key=lambda r: r.robust).defense
    broken_by = report.broken_by()
    for name in report.defenses:
        label = name if name != "early" else f"early (z_{report.early_exit})"
        clean = _pct(float(sum(report.clean[name]) / len(report.clean[name])))
        robust = str(robustness[name])
        if name == best:
            robust = f"**{robust}**"
        counts = [(c, broken_by[name].count(c)) for c in report.order[name]]
        first = ", ".join(f"{c} {k}" for c, k in counts if k) or "none"
        lines.append(f"| {label} | {clean} | {robust} | {first} |")
    return "\n".join(lines)


def summary_lines(report: EvaluationReport) -> list[str]:
    """The white-box robustness numbers, the chosen settings and the sweep's plan."""
    lines = []
    if report.mode == "table":
        paper = report.matrix().paper_robustness()
        lines.append(
            f"White-box robustness (paper: max over defenses of min over columns): {paper} "
            f"({paper.defense} defense)."
        )
    sample = max(report.robustness(), key=lambda r: r.robust)
    lines += [
        f"White-box robustness (per sample: survives every column): {sample} "
        f"({sample.defense} defense)."
        + (" Cascade mode: each column attacked only the samples still robust." if
           report.mode == "cascade" else "")
        + (" Verdict mode: the columns the development split needs, the others audited." if
           report.mode == "verdict" else ""),
        f"Early exit n* = {report.early_exit} (development split, ready-made PGD"
        + _tie(report.development)
        + ").",
        "Strongest intermediate attacks (development sweep of "
        f"{len(report.sweep)} candidates, largest drop of early(n*)): "
        + ", ".join(_chosen(report, family) for family in report.chosen)
        + ".",
    ]  # fmt: skip
    lines += plan_lines(report)
    lines += audit_lines(report)
    lines += cost_lines(report)
    return lines


def audit_lines(report: EvaluationReport) -> list[str]:
    """Verdict mode: per defense, the columns kept by the development split and the audit of
    the skipped ones (size, breaks, escalations, the bound that widens the interval)."""
    lines = []
    for defense, a in report.audit.items():
        skipped = len(a["skipped"])
        broke = a["broken"]
        escalated = ", ".join(a["escalated"]) or "none"
        swapped = "".join(f" ({k} replaced by the cheaper {v})" for k, v in a["swapped"].items())
        lines.append(
            f"Verdict mode, {defense}: kept {', '.join(a['kept'])}{swapped}; the audit ran the "
            f"{skipped} skipped columns on {a['size']} of {a['survivors']} survivors and broke "
            f"{broke} of them (escalated to every survivor: {escalated}); at most "
            f"{100 * a['bound']:.1f}% of the {a['unaudited']} unaudited survivors would fall "
            f"to the columns left skipped (one-sided {100 * a['confidence']:.0f}% "
            "Clopper-Pearson), and the interval's lower end is widened by it."
        )
    return lines


def cost_lines(report: EvaluationReport) -> list[str]:
    """The expected f evaluations of the attack steps against the counted ones."""
    cost = report.cost_record()
    expected, actual = cost.get("expected_f_evals", {}), cost.get("actual_f_evals", {})
    if not expected:
        return []
    counted = sum(v for v in actual.values() if v is not None)
    bound = " at most" if cost.get("bound") else ""
    return [
        f"Cost: expected{bound} {sum(expected.values()):,.0f} f evaluations "
        f"(~{cost['expected_wall_s']:,.0f} s) before the work; counted {counted:,.0f} in "
        f"{', '.join(expected)}."
    ]


def plan_lines(report: EvaluationReport) -> list[str]:
    """What each sweep family did over the model's solver, and why."""
    solver = report.settings.get("solver", "the solver")
    lines = []
    for plan in report.settings.get("sweep_plan", []):
        fixed = ", ".join(f"{k}={v}" for k, v in plan["fixed"].items())
        runs = "runs" if plan["runs"] else "does not run"
        text = f"Sweep over {solver}: {plan['family']} {runs}"
        text += f" with {fixed}" if fixed else ""
        text += f": {plan['reason']}."
        lines.append(text + "".join(f" {note}." for note in plan.get("left_out", [])))
    return lines


def convergence_lines(report: EvaluationReport) -> list[str]:
    """The forwards that ended above the residual limit, in words (the call sites, source
    lines of the package, stay in ``results.json``)."""
    records = report.convergence
    unconverged = sum(r["unconverged_calls"] for r in records)
    if not unconverged:
        return []
    calls = sum(r["calls"] for r in records)
    above = sum(r["samples_above"] for r in records)
    samples = sum(r["samples"] for r in records)
    worst = [r["worst_residual"] for r in records if r.get("worst_residual") is not None]
    shown = f" (worst relative residual {max(worst):.3g})" if worst else ""
    return [
        f"Unconverged forward solves: {unconverged} of {calls} forwards left {above} of "
        f"{samples} samples above the relative residual 0.05{shown}: the fixed point was not "
        "reached there."
    ]


def _chosen(report: EvaluationReport, family: str) -> str:
    """``Adjoint(n=4, beta=1.0): early 73.0% (dev)`` for the chosen candidate of a family."""
    entry = next(e for e in report.sweep if e["estimate"] == report.chosen[family])
    params = ", ".join(f"{k}={v}" for k, v in entry["params"].items())
    return f"{family.capitalize()}({params}): early {_pct(entry['accuracy']['early'])}% (dev)"


def entropy_defense_lines(report: EvaluationReport) -> list[str]:
    """The input-entropy-reduction defense (when evaluated): the defended clean accuracy, the
    authors' non-adaptive column, each adaptive attack and the adaptive worst case, with 95%
    Wilson intervals, and what they mean."""
    result = report.entropy_defense
    if result is None:
        return []
    lines = [
        "## Input-entropy-reduction defense (Yang et al. 2023)",
        "",
        "| evaluation | column | accuracy (%) [95% CI] |",
        "|---|---|---|",
    ]
    for column in result.correct:
        kind = entropy_defense.kind(column)
        if kind != "undefended":
            acc, low, high = result.accuracy(column)
            lines.append(f"| {kind} | {column} | {_pct(acc)} [{_pct(low)}, {_pct(high)}] |")
    defense = ", ".join(f"{k}={v}" for k, v in result.settings["defense"].items())
    return lines + [
        "",
        "The authors' evaluation is not adaptive: their PGD is crafted on the undefended DEQ "
        "and scored with the defense on. The adaptive attacks attack the defended model itself "
        "(the exact gradient through its inner steps, BPDA); the adaptive worst case (a sample "
        "counts only if it survives every one of them) is the defense's robust accuracy. It "
        "does not count in the white-box robustness above (the readouts'): its attacks are "
        f"fewer than the protocol's columns. Defense: {defense}; "
        f"{result.settings['n']} test images.",
        "",
    ]


def diagnostics_table(report: EvaluationReport) -> str:
    """One row per check: its verdict and its sentence."""
    lines = ["| check | verdict | finding |", "|---|---|---|"]
    for check in report.diagnostics:
        verdict = "**flag**" if check.verdict == "flag" else "pass"
        lines.append(f"| {check.name} | {verdict} | {check.message} |")
    return "\n".join(lines)


def markdown_report(report: EvaluationReport, title: str) -> str:
    if report.mode == "table":
        legend = "Accuracy (%) of each defense (rows) under each attack column."
    else:
        legend = (
            "Per defense (rows): clean accuracy (%), the robust accuracy per sample (%) with "
            "its 95% Wilson interval, and how many samples each column broke first."
        )
    return "\n".join(
        [
            f"# {title}",
            "",
            *facts.setting_lines(report),
            "",
            legend,
            "",
            markdown_table(report),
            "",
            *summary_lines(report),
            *convergence_lines(report),
            "",
            *entropy_defense_lines(report),
            "## Diagnostics",
            "",
            diagnostics_table(report),
        ]
    )


def write_outputs(report: EvaluationReport, out_dir: Path, title: str) -> dict[str, Path]:
    """``results.json`` (every cell, its settings, per-sample flags), ``results.md``,
    ``results.tex`` (the table for a paper), and the plots ``states`` and ``sweep`` as PNG and
    PDF (the result store, a file of its own, is left as it is)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "latex": out_dir / "results.tex",
    }
    paths["json"].write_text(json.dumps(report.to_json(), indent=1))
    paths["markdown"].write_text(markdown_report(report, title) + "\n")
    paths["latex"].write_text(latex_table(report))
    paths["states"] = plot_states(report, out_dir / "states.png")
    paths["states_pdf"] = paths["states"].with_suffix(".pdf")
    paths["sweep"] = plot_sweep(report, out_dir / "sweep.png")
    paths["sweep_pdf"] = paths["sweep"].with_suffix(".pdf")
    return paths


def _save(fig: Any, path: Path) -> Path:
    """``path`` (PNG) and the same figure as PDF beside it."""
    fig.savefig(path, dpi=120)
    fig.savefig(path.with_suffix(".pdf"))
    return path


def plot_states(report: EvaluationReport, path: Path) -> Path:
    """Clean and ready-made-PGD accuracy of every iterate, and its residual (Fig. 2, 5), on
    the test split; titled with the model, data and split, norm and eps; PNG and PDF."""
    from matplotlib.figure import Figure

    states = report.states
    steps = range(1, len(states["clean_accuracy"]) + 1)
    fig = Figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    left.plot(steps, [100 * v for v in states["clean_accuracy"]], "o-", label="clean")
    left.plot(steps, [100 * v for v in states["ready_made_accuracy"]], "s-", label="ready-made PGD")
    left.axvline(report.early_exit, color="gray", linestyle=":", label="n*")
    left.set_xlabel("iterate n")
    left.set_ylabel("accuracy of z_n (%)")
    left.legend()
    right.semilogy(steps, states["residual"], "o-")
    right.axhline(0.05, color="gray", linestyle="--", label="0.05")
    right.set_xlabel("iterate n")
    right.set_ylabel("relative residual")
    right.legend()
    fig.suptitle(facts.figure_title(report, "test"), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _left_on_a_tie(entry: Mapping[str, Any], raced: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``entry`` left the race in a round where a candidate of its family with the same
    accuracy went on (the margin rank sums decided)."""
    last = entry["race"][-1]
    if last.get("goes_on", True):
        return False
    return any(
        r["round"] == last["round"] and r.get("goes_on") and r["accuracy"] == last["accuracy"]
        for other in raced
        if other["family"] == entry["family"]
        for r in other["race"]
    )


def plot_sweep(report: EvaluationReport, path: Path) -> Path:
    """Accuracy of the early-state defense under each intermediate attack against n, one line
    per (beta) or (k, lambda) (Fig. 3 and 4), on the development split; after a racing sweep a
    third panel: each candidate's accuracy against the development images it had seen, round by
    round (a candidate that left the race early is scored on fewer images); titled with the
    model, data and split, norm and eps; PNG and PDF."""
    from matplotlib.figure import Figure

    raced = [e for e in report.sweep if "race" in e]
    fig = Figure(figsize=(15 if raced else 10, 3.5))
    axes = fig.subplots(1, 3 if raced else 2, sharey=True)
    if raced:
        for entry in raced:
            seen = [r["images"] for r in entry["race"]]
            accuracy = [100 * r["accuracy"] for r in entry["race"]]
            chosen = bool(entry.get("chosen"))
            label = entry["estimate"] if chosen else None
            (line,) = axes[2].plot(seen, accuracy, "o-" if chosen else "o:", label=label)
            if _left_on_a_tie(entry, raced):
                axes[2].plot(seen[-1], accuracy[-1], "x", color=line.get_color(), ms=9)
        axes[2].set_xscale("log", base=2)
        axes[2].set_title("race (halving; solid: chosen; x: out on the margin tie-break)")
        axes[2].set_xlabel("development images seen")
        axes[2].legend(fontsize=6)
    for ax, family in zip(axes[:2], ("adjoint", "unrolled"), strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for entry in report.sweep:
            if entry["family"] != family:
                continue
            params = {k: v for k, v in entry["params"].items() if k != "n"}
            key = ", ".join(f"{k}={v}" for k, v in params.items())
            lines.setdefault(key, []).append((entry["params"]["n"], entry["accuracy"]["early"]))
        for key, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=key)
        ax.set_title(f"{family} z_n")
        ax.set_xlabel("n")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"early (z_{report.early_exit}) accuracy (%)")
    fig.suptitle(facts.figure_title(report, "development"), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def markdown_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows (dicts) as a markdown table: the columns are every key in first-seen order (a row
    without one leaves its cell empty), floats with 2 decimals; ``(empty)`` for no rows."""
    if not rows:
        return "(empty)"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        text = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells]
        lines.append("| " + " | ".join(text) + " |")
    return "\n".join(lines)


def write_tables(
    out_dir: str | Path,
    title: str,
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    record: Mapping[str, Any],
    *,
    intro: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (created); return the markdown.

    ``results.json`` is ``record`` as plain JSON (numpy arrays and scalars, enums, paths and
    dataclasses converted); ``results.md`` is ``# title``, the ``intro`` lines, then each of
    ``tables`` under ``## <its name>`` (``markdown_rows``), then the ``notes`` as a list."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(jsonable(plain(record)), indent=2))
    parts = [f"# {title}", *intro, ""]
    for name, rows in tables.items():
        parts += [f"## {name}", "", markdown_rows(rows), ""]
    parts += [f"- {note}" for note in notes]
    text = "\n".join(parts) + "\n"
    (out / "results.md").write_text(text)
    return text


def _tie(development: dict) -> str:
    """``; tied with z_a, z_b at x%: best clean accuracy, then the latest`` for a tie."""
    tied = development.get("early_exit_tied") or []
    if len(tied) < 2:
        return ""
    accuracy = development["pgd_accuracy_per_state"][tied[0] - 1]
    return (
        f"; {len(tied)} iterates tie at {100 * accuracy:.1f}% (z_"
        + ", z_".join(map(str, tied))
        + "): the best clean accuracy among them, then the latest"
    )
