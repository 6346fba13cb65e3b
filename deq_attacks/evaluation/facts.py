"""What a reader of a report must know to trust its numbers, in words: the threat model, the
sample counts, the mode, every budget marked standard or reduced, and what was not run; and
the titles of its figures (model, data and split, norm, eps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deq_attacks.evaluation.attacks import ATTACKS, parse_attack
from deq_attacks.evaluation.result import EvaluationReport
from deq_attacks.registry import parse_spec, split_specs

#: The protocol's own standard budgets (``EvaluationConfig``); each attack's are its own
#: (``Attack.budgets``, read from its spec in the run's ``attacks``).
STANDARD = {"steps": 10, "long_steps": 100}
#: The attack columns of the full protocol.
ALL_ATTACKS = ("pgd", "autoattack", "square")


@dataclass(frozen=True)
class Budget:
    """One budget of a run: what it is, its value, and whether it is the standard one."""

    name: str
    value: str
    standard: bool

    def __str__(self) -> str:
        return f"{self.name}: {self.value} ({'standard' if self.standard else 'REDUCED'})"


def _config(report: EvaluationReport) -> dict[str, Any]:
    return dict(report.settings.get("config", {}))


def description(report: EvaluationReport) -> dict[str, Any]:
    """What the caller said the run is (model, data, ...), or {}."""
    return dict(report.settings.get("fingerprint", {}).get("description", {}))


#: How a threat model's norm is written in a report.
NORM_TEXT = {"Linf": "L-inf", "L2": "L2"}


def norm_text(report: EvaluationReport) -> str:
    """``L-inf`` or ``L2``: the run's norm as a report writes it."""
    return NORM_TEXT[report.settings["threat"].get("norm", "Linf")]


def threat_model(report: EvaluationReport) -> str:
    """``L-inf, eps 0.1, inputs in [0, 1]; PGD-10 with step 0.025 and one uniform random
    start``."""
    threat = report.settings["threat"]
    return (
        f"{norm_text(report)}, eps {threat['eps']:.4g}, inputs in [0, 1]; PGD-{threat['steps']} "
        f"with step "
        f"{threat['step']:.4g} and one uniform random start; white-box (every gradient "
        "estimate and defense known to the attacker)"
    )


def budgets(report: EvaluationReport) -> list[Budget]:
    """Every attack budget of the run that has a standard value, marked standard or reduced
    (AutoAttack's only where it ran)."""
    config = _config(report)
    found = []
    if "steps" in config:
        found.append(_standard("PGD steps", "steps", int(config["steps"])))
    for spec in split_specs(str(config.get("attacks", "pgd"))):
        name = parse_spec(spec)[0]
        if name not in ATTACKS:  # a user's attack, registered in the run's process only
            found.append(Budget(f"{name} budget", f"{spec} (attack not registered here)", False))
            continue
        marks = parse_attack(spec).budget_marks()
        found += [Budget(label, str(value), ok) for label, value, ok in marks]
    if "long_steps" in config:
        found.append(_standard("more-steps check, PGD steps", "long_steps", config["long_steps"]))
    return found


def _standard(label: str, key: str, value: int) -> Budget:
    return Budget(label, str(value), int(value) >= STANDARD[key])


def standard(report: EvaluationReport) -> bool:
    """Whether every budget was the standard one and the full set of columns ran."""
    return all(b.standard for b in budgets(report)) and not not_run(report)


def not_run(report: EvaluationReport) -> list[str]:
    """What the full protocol has and this run left out, one phrase each."""
    config = _config(report)
    attacks = [parse_spec(s)[0] for s in split_specs(str(config.get("attacks", "pgd")))]
    missing = [f"the {name} column" for name in ALL_ATTACKS if name not in attacks]
    if config.get("bptt") is False:
        missing.append("backpropagation through the solver (the BPTT yardstick column)")
    if report.mode != "table":
        missing.append(
            "every column on every sample (cascade mode: a column attacks only the samples "
            "still robust, so per-column accuracies are not measured)"
        )
    return missing


def setting_lines(report: EvaluationReport) -> list[str]:
    """The run's facts as markdown lines."""
    about = description(report)
    lines = [f"- Threat model: {threat_model(report)}."]
    if about.get("model") or about.get("data"):
        model, data = about.get("model", "not given"), about.get("data", "not given")
        lines.append(f"- Model: {model}; data: {data}.")
    lines += [
        f"- Samples: {report.settings['n_test']} test images (every accuracy below is over "
        f"them; intervals are 95% Wilson score intervals), {report.settings['n_development']} "
        "development images (early exit and sweep chosen there, disjoint from the test images).",
        f"- Mode: {report.mode} ("
        + ("every column on every sample" if report.mode == "table" else
           "per-sample verdict: columns strongest first, each on the samples still robust")
        + ").",
        "- Budgets: " + "; ".join(str(b) for b in budgets(report)) + ".",
    ]  # fmt: skip
    if not standard(report):
        lines.append(
            "- **Not the standard evaluation**: the numbers are upper bounds that a standard "
            "run may lower; do not compare them with published standard AutoAttack results."
        )
    missing = not_run(report)
    lines.append("- Not run: " + ("; ".join(missing) if missing else "nothing") + ".")
    return lines


def figure_title(report: EvaluationReport, split: str) -> str:
    """``small_conv_deq (demo preset) on digits, test split (n=100), L-inf eps=0.1``."""
    about = description(report)
    n = report.settings["n_test" if split == "test" else "n_development"]
    threat = report.settings["threat"]
    return (
        f"{about.get('model', 'model')} on {about.get('data', 'data')}, {split} split "
        f"(n={n}), {norm_text(report)} eps={threat['eps']:.4g}"
    )
