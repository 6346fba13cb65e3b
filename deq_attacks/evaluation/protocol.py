"""The white-box evaluation protocol of Sec. 6.2-6.3: attacks x defenses, min over attacks,
max over defenses, early exit chosen on a development split, obfuscation signals."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from deq_attacks.deq.readout import Early, Readout
from deq_attacks.evaluation.attacks import AttackSpec, ThreatModel
from deq_attacks.interfaces import DEQEstimator

RESIDUAL_LIMIT = 0.05
"""Relative residuals above this mean the fixed point was not reached (Fig. 2b, 5a)."""


def accuracy(estimator: DEQEstimator, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Top-1 accuracy of the estimator's current defense."""
    return float((estimator.predict(x, batch_size=batch_size).argmax(1) == y).mean())


def per_state_accuracy(
    estimator: DEQEstimator, x: np.ndarray, y: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of every raw iterate ``z_n`` as the readout, and its mean relative residual.

    Returns two arrays of shape (threshold,): accuracy and mean residual of z_1..z_N.
    """
    deq = estimator.deq
    threshold = deq.solver.threshold
    correct = np.zeros(threshold)
    residual = np.zeros(threshold)
    deq.eval()
    device = next(deq.parameters()).device
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start : start + batch_size]).to(device)
            yb = torch.from_numpy(y[start : start + batch_size]).to(device)
            injection = deq.inject(xb)
            trajectory = deq.solve(injection, keep=True)
            for n in range(1, threshold + 1):
                logits = deq.logits(trajectory.state(n), injection)
                correct[n - 1] += float((logits.argmax(1) == yb).sum())
                residual[n - 1] += float(trajectory.residual(n).sum())
    return correct / len(x), residual / len(x)


@dataclass
class EvaluationResult:
    """Accuracies (fractions) of each defense under each attack, plus diagnostics."""

    clean: dict[str, float] = field(default_factory=dict)
    robust: dict[str, dict[str, float]] = field(default_factory=dict)
    early_exit: int | None = None
    development: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)

    def worst_case(self) -> dict[str, float]:
        """Per defense: the minimum accuracy over all attacks run (its robustness)."""
        return {d: min(cells.values()) for d, cells in self.robust.items() if cells}

    def white_box_robustness(self) -> tuple[str, float]:
        """The most robust defense and its worst-case accuracy (max over defenses of min)."""
        worst = self.worst_case()
        best = max(worst, key=lambda d: worst[d])
        return best, worst[best]

    def obfuscation_signals(self, query_labels: Sequence[str]) -> list[str]:
        """Warnings of gradient obfuscation (Athalye et al. 2018, Carlini et al. 2019)."""
        signals = []
        for defense, cells in self.robust.items():
            gradient = {a: v for a, v in cells.items() if a not in query_labels}
            for q in query_labels:
                if q in cells and gradient and cells[q] < min(gradient.values()):
                    signals.append(
                        f"{defense}: query attack {q} ({cells[q]:.1%}) beats every gradient "
                        f"attack (best {min(gradient.values()):.1%})"
                    )
        states = self.development.get("pgd_accuracy_per_state")
        if states and max(states) > states[-1] + 0.02:
            n = int(np.argmax(states)) + 1
            signals.append(
                f"robustness accumulation: z_{n} is more robust ({max(states):.1%}) than the final "
                f"iterate ({states[-1]:.1%}) under the ready-made attack"
            )
        residuals = self.development.get("residual_per_state")
        if residuals and residuals[-1] > RESIDUAL_LIMIT:
            signals.append(
                f"fixed point not reached: relative residual {residuals[-1]:.3f} at the last "
                f"iterate (> {RESIDUAL_LIMIT})"
            )
        return signals

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def select_early_exit(
    estimator: DEQEstimator,
    ready_made: AttackSpec,
    x_dev: np.ndarray,
    y_dev: np.ndarray,
    threat: ThreatModel,
    batch_size: int,
) -> tuple[int, dict[str, list[float]]]:
    """Choose the early-exit step by the best accuracy under the ready-made attack on the
    development split (Sec. 5.2). The ready-made attack's gradient does not depend on the
    readout, so one attack run scores every state."""
    x_adv = ready_made.generate(estimator, x_dev, y_dev, threat, batch_size)
    robust, _ = per_state_accuracy(estimator, x_adv, y_dev, batch_size)
    clean, residual = per_state_accuracy(estimator, x_dev, y_dev, batch_size)
    best = int(np.argmax(robust)) + 1
    return best, {
        "pgd_accuracy_per_state": robust.tolist(),
        "clean_accuracy_per_state": clean.tolist(),
        "residual_per_state": residual.tolist(),
    }


class ResultStore:
    """A JSON file of finished cells, so an interrupted evaluation resumes where it stopped.

    Cells are keyed by defense and attack label under a fingerprint of the settings; a file
    written under other settings is not reused.
    """

    def __init__(self, path: Path | None, settings: Mapping[str, object]) -> None:
        self.path = path
        self.settings = json.loads(json.dumps(settings, default=str))
        self.result = EvaluationResult(settings=self.settings)
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == self.settings:
                self.result = EvaluationResult(**saved)

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.result.to_json(), indent=2))
            tmp.replace(self.path)


def evaluate(
    estimator: DEQEstimator,
    attacks: Sequence[AttackSpec],
    defenses: Mapping[str, Readout],
    x_test: np.ndarray,
    y_test: np.ndarray,
    threat: ThreatModel,
    *,
    development: tuple[np.ndarray, np.ndarray] | None = None,
    ready_made: AttackSpec | None = None,
    batch_size: int = 100,
    results_path: Path | None = None,
    settings: Mapping[str, object] | None = None,
) -> EvaluationResult:
    """Run every attack against every defense and record accuracies.

    Args:
        estimator: the model; its estimate and defense are switched per cell and restored.
        attacks: the columns.
        defenses: the rows by name; the name ``"early"`` with ``development`` and
            ``ready_made`` given is replaced by ``Early(n)`` with n chosen on that split.
        x_test, y_test: test images (N, C, H, W) float32 in [0, 1] and labels (N,).
        threat: eps, step and steps.
        development: the development split for the early-exit choice.
        ready_made: the attack that chooses the early exit (paper: PGD-10, training gradient).
        batch_size: attack and prediction batch size.
        results_path: JSON file for resuming and for the result.
        settings: extra descriptive settings stored with the result (part of its fingerprint).
    """
    labels = [a.label for a in attacks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"attack labels must be unique, got {labels}")
    fingerprint = {
        "threat": asdict(threat),
        "attacks": [repr(a) for a in attacks],
        "defenses": {k: repr(v) for k, v in defenses.items()},
        "n_test": len(x_test),
        **(settings or {}),
    }
    store = ResultStore(results_path, fingerprint)
    result = store.result
    rows = dict(defenses)
    with estimator.using():
        if "early" in rows and development is not None and ready_made is not None:
            if result.early_exit is None:
                n, dev = select_early_exit(
                    estimator, ready_made, development[0], development[1], threat, batch_size
                )
                result.early_exit, result.development = n, dev
                store.save()
            rows["early"] = Early(result.early_exit)
        cells = [(d, a) for d in rows for a in attacks]
        todo = [(d, a) for d, a in cells if a.label not in result.robust.get(d, {})]
        progress = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="white-box cells")
        for name, defense in rows.items():
            estimator.defense = defense
            if name not in result.clean:
                result.clean[name] = accuracy(estimator, x_test, y_test, batch_size)
                store.save()
            for attack in attacks:
                if attack.label in result.robust.get(name, {}):
                    continue
                progress.set_postfix_str(f"{name} / {attack.label}")
                x_adv = attack.generate(estimator, x_test, y_test, threat, batch_size)
                result.robust.setdefault(name, {})[attack.label] = accuracy(
                    estimator, x_adv, y_test, batch_size
                )
                store.save()
                progress.update()
        progress.close()
    return result
