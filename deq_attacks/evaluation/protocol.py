"""The white-box evaluation protocol of Sec. 6.2-6.3, whole, in one call: ``evaluate_model``.

1. Development split: the ready-made PGD (training gradient) scores every iterate z_n; the
   early exit n* is the most robust one (chosen once, then fixed).
2. Development split: the sweep of intermediate attacks (Adjoint over n, beta; Unrolled over
   n, k, lambda); per family, the one with the largest drop of Early(n*) is chosen.
3. Test split: for each gradient estimate (ready-made, Exact, the two chosen intermediate ones,
   the two gradient ensembles; more by ``extra_estimates``), one shared PGD run scores every
   defense (final, early(n*), ensemble) and every iterate; the standard AutoAttack runs per
   defense with that estimate; Square runs per defense.
4. Per-sample survival matrix, both aggregations with Wilson intervals, diagnostics with
   verdicts. Every finished step is stored with a fingerprint of the settings, the weights and
   the data; a rerun resumes from it. Under ``torchrun`` the samples are sharded by index.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deq_attacks.config import to_jsonable
from deq_attacks.deq.readout import Early, Ensemble, Final, Readout
from deq_attacks.evaluation import diagnostics as diag
from deq_attacks.evaluation.aggregate import choose_early_exit
from deq_attacks.evaluation.alignment import alignment_check
from deq_attacks.evaluation.attacks import AttackSpec, ThreatModel
from deq_attacks.evaluation.columns import BPTT, READY_MADE, protocol_columns, protocol_estimates
from deq_attacks.evaluation.distributed import Shards, map_blocks
from deq_attacks.evaluation.result import EvaluationReport
from deq_attacks.evaluation.scoring import score_readouts
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.evaluation.shared_runs import clean_scores, shared_pgd_scores
from deq_attacks.evaluation.store import ResultStore, data_hash, weights_hash
from deq_attacks.evaluation.sweep import run_sweep
from deq_attacks.gradients import BackpropThroughSolver, Exact, GradientEstimate, ready_made
from deq_attacks.interfaces import DEQEstimator


def _check_split(name: str, x: np.ndarray, y: np.ndarray, estimator: DEQEstimator) -> None:
    if x.ndim < 2 or len(x) == 0 or len(x) != len(y):
        raise ValueError(f"{name}: need a non-empty batch and one label per image, got {x.shape}")
    if tuple(x.shape[1:]) != tuple(estimator.input_shape):
        raise ValueError(
            f"{name}: images {x.shape[1:]} but the model takes {estimator.input_shape}"
        )
    if x.dtype != np.float32 or x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name}: images must be float32 in [0, 1]")
    if y.min() < 0 or y.max() >= estimator.nb_classes:
        raise ValueError(f"{name}: labels must lie in 0..{estimator.nb_classes - 1}")


def evaluate_model(
    estimator: DEQEstimator,
    test: tuple[np.ndarray, np.ndarray],
    development: tuple[np.ndarray, np.ndarray],
    config: EvaluationConfig | None = None,
    *,
    results_path: Path | None = None,
    extra_estimates: Mapping[str, GradientEstimate] | None = None,
    description: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> EvaluationReport:
    """Run the whole protocol (see the module docstring) and return its report.

    Args:
        estimator: the model; its estimate and defense are switched per step and restored.
        test: images (S, C, H, W) float32 in [0, 1] and labels (S,).
        development: the split for n* and the sweep (held out from training and test).
        config: the settings (default ``EvaluationConfig()``).
        results_path: the JSON of per-sample results to resume from and write.
        extra_estimates: more gradient columns by label (e.g. BPTT).
        description: what is evaluated (model name, checkpoint...), stored in the settings.
        progress: callable(str) told of each step (e.g. print); None is silent.
    """
    config = config or EvaluationConfig()
    (x, y), (x_dev, y_dev) = test, development
    _check_split("test", x, y, estimator)
    _check_split("development", x_dev, y_dev, estimator)
    deq = estimator.deq
    threat = config.threat
    shards = Shards.current(config.batch_size)
    say = progress or (lambda _text: None)
    ready = ready_made(deq.training_gradient)
    fingerprint = {
        "config": to_jsonable(config),
        "weights": weights_hash(deq),
        "data": data_hash(x, y, x_dev, y_dev),
        "solver": repr(deq.solver),
        "training_gradient": repr(deq.training_gradient),
        "extra_estimates": {k: repr(v) for k, v in (extra_estimates or {}).items()},
        "description": dict(description or {}),
    }
    store = ResultStore(results_path, fingerprint, shards)
    if store.resumed:
        say(f"resuming from {results_path}")
    with estimator.using():
        # 1. the early exit n*, by the ready-made PGD on the development split
        dev = store.get("development")
        if dev is None:
            say("development split: ready-made PGD over every iterate")
            attacked = shared_pgd_scores(
                estimator, ready, x_dev, y_dev, threat, {"final": Final()}, shards, seed=config.seed
            )
            clean = clean_scores(estimator, x_dev, y_dev, {"final": Final()}, shards)
            dev = store.put(
                "development",
                {
                    "early_exit": choose_early_exit(attacked["states"]),
                    "pgd_accuracy_per_state": attacked["states"].mean(0),
                    "clean_accuracy_per_state": clean["states"].mean(0),
                    "residual_per_state": clean["residuals"].mean(0),
                },
            )
        n_star = int(dev["early_exit"])
        defenses: dict[str, Readout] = {
            "final": Final(),
            "early": Early(n_star),
            "ensemble": Ensemble(),
        }

        # 2. the sweep of intermediate attacks on the development split
        done = store.get("sweep") or {}

        def keep_entry(entry: dict[str, Any]) -> None:
            done[entry["estimate"]] = entry
            store.put("sweep", done)

        say("development split: sweep of intermediate attacks")
        chosen, sweep, sweep_plan = run_sweep(
            estimator, config.sweep, x_dev, y_dev, threat, defenses, "early", shards,
            seed=config.seed, done=done, on_entry=keep_entry,
        )  # fmt: skip

        # 3. the test split: clean, shared PGD runs, per-defense attacks
        estimates = protocol_estimates(
            ready, chosen, {**yardstick(config), **dict(extra_estimates or {})}
        )
        columns = protocol_columns(estimates, config)
        clean = store.get("clean") or store.put(
            "clean", clean_scores(estimator, x, y, defenses, shards)
        )
        survived: dict[str, dict[str, list[bool]]] = {d: {} for d in defenses}
        extras: dict[str, dict[str, list[Any]]] = {}
        ready_scores: dict[str, Any] = {}
        for column in columns:
            if column.kind.shared:
                assert column.estimate is not None
                for key, scored in _pgd_runs(column, defenses).items():
                    result = store.get(key)
                    if result is None:
                        say(f"test split: {column.label} (one run for {', '.join(scored)})")
                        with estimator.using(defense=next(iter(scored.values()))):
                            result = store.put(
                                key,
                                shared_pgd_scores(
                                    estimator, column.estimate, x, y, threat, scored, shards,
                                    seed=config.seed, steps=column.steps,
                                ),
                            )  # fmt: skip
                    for d in scored:
                        survived[d][column.label] = result[f"defense/{d}"]
                    if column.estimate == ready:
                        ready_scores = result
                continue
            for name, readout in defenses.items():
                key = f"{name}/{column.label}"
                result = store.get(key)
                if result is None:
                    say(f"test split: {column.label} against {name}")
                    result = store.put(
                        key, _defended_run(estimator, column, readout, x, y, threat, config, shards)
                    )
                survived[name][column.label] = result["correct"]
                rest = {k: v for k, v in result.items() if k != "correct"}
                if rest:
                    extras[key] = rest

        # 4. diagnostics
        checks = store.get("diagnostics")
        if checks is None:
            say("diagnostics")
            found = _diagnostics(
                estimator, estimates, defenses, survived, clean, ready_scores, x, y, config,
                shards, say,
            )  # fmt: skip
            checks = store.put("diagnostics", [c.to_json() for c in found])
    report = EvaluationReport(
        settings={
            "config": to_jsonable(config),
            "threat": to_jsonable(threat),
            "fingerprint": fingerprint,
            "n_test": len(x),
            "n_development": len(x_dev),
            "processes": shards.world,
            "sweep_plan": sweep_plan,
        },
        early_exit=n_star,
        development=dev,
        sweep=sweep,
        chosen={k: repr(v) for k, v in chosen.items()},
        defenses={k: repr(v) for k, v in defenses.items()},
        columns={c.label: c.describe(threat) for c in columns},
        clean={d: list(map(bool, clean[f"defense/{d}"])) for d in defenses},
        survived={
            d: {c: list(map(bool, v)) for c, v in cells.items()} for d, cells in survived.items()
        },
        extras=extras,
        states={
            "clean_accuracy": np.mean(clean["states"], axis=0).tolist(),
            "ready_made_accuracy": np.mean(ready_scores["states"], axis=0).tolist(),
            "residual": np.mean(clean["residuals"], axis=0).tolist(),
        },
        diagnostics=[diag.Check(**c) for c in checks],
    )
    return report


def _defended_run(
    estimator: DEQEstimator,
    column: AttackSpec,
    readout: Readout,
    x: np.ndarray,
    y: np.ndarray,
    threat: ThreatModel,
    config: EvaluationConfig,
    shards: Shards,
) -> dict[str, np.ndarray]:
    """A per-defense attack, block by block: per-sample correctness under it and its extras."""

    def block(part: slice) -> dict[str, np.ndarray]:
        with estimator.using(defense=readout):
            x_adv, extra = column.run_defended(
                estimator, x[part], y[part], threat, seed=config.seed + part.start
            )
        correct = score_readouts(estimator, x_adv, y[part], {"d": readout}, len(x_adv))
        return {"correct": correct["defense/d"], **extra}

    return map_blocks(block, len(x), shards)


def yardstick(config: EvaluationConfig) -> dict[str, GradientEstimate]:
    """The BPTT column (the true gradient of the defended logits), unless switched off."""
    if not config.bptt:
        return {}
    return {BPTT: BackpropThroughSolver(checkpoint=config.bptt_checkpoint)}


def _pgd_runs(column: AttackSpec, defenses: Mapping[str, Readout]) -> dict[str, dict[str, Readout]]:
    """Store key -> the defenses one fixed-step PGD run scores: one shared run for an estimate
    that ignores the defense, one run per defense for one that differentiates it (BPTT)."""
    assert column.estimate is not None
    if not column.estimate.depends_on_defense:
        return {f"shared/{column.label}": dict(defenses)}
    return {f"{name}/{column.label}": {name: readout} for name, readout in defenses.items()}


def _diagnostics(
    estimator: DEQEstimator,
    estimates: Mapping[str, GradientEstimate],
    defenses: Mapping[str, Readout],
    survived: Mapping[str, Mapping[str, Any]],
    clean: Mapping[str, Any],
    ready_scores: Mapping[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    config: EvaluationConfig,
    shards: Shards,
    say: Any,
) -> list[diag.Check]:
    """The checks with verdicts (see ``deq_attacks.evaluation.diagnostics``)."""
    threat = config.threat
    ready = estimates[READY_MADE]
    accuracy = {
        d: {c: float(np.mean(v)) for c, v in cells.items()} for d, cells in survived.items()
    }
    checks = [diag.square_check(accuracy, "square")]
    ready_label = f"{READY_MADE} PGD"
    say(f"diagnostics: PGD-{config.long_steps} and eps={config.large_eps}")
    longer = shared_pgd_scores(
        estimator, ready, x, y, threat, defenses, shards, seed=config.seed, steps=config.long_steps
    )
    short = {d: np.asarray(survived[d][ready_label], dtype=bool) for d in defenses}
    clean_ok = {d: np.asarray(clean[f"defense/{d}"], dtype=bool) for d in defenses}
    long = {d: longer[f"defense/{d}"] & clean_ok[d] for d in defenses}
    checks.append(diag.more_steps_check(short, long, (config.steps, config.long_steps)))
    large = ThreatModel(config.large_eps, config.large_eps / 4, config.steps)
    wide = shared_pgd_scores(estimator, ready, x, y, large, defenses, shards, seed=config.seed)
    checks.append(diag.large_eps_check({d: wide[f"defense/{d}"] for d in defenses}, large.eps))
    checks.append(diag.accumulation_check(np.asarray(ready_scores["states"], dtype=bool)))
    residual = np.asarray(clean["residuals"], dtype=float)[:, -1]
    checks.append(diag.forward_convergence_check(residual))
    few = slice(0, min(config.diagnostic_samples, len(x)))
    batch, random = diag.batch_and_randomness_check(estimator, x[few], config.batch_size)
    checks += [batch, random]
    checks.append(diag.gradient_health_check(estimator, estimates, x[few], y[few]))
    checks.append(diag.exact_backward_check(estimator, Exact(), x[few], y[few]))
    if BPTT in estimates:
        say("diagnostics: alignment of every estimate with backprop through the solver")
        checks.append(alignment_check(estimator, estimates, defenses, x[few], y[few]))
    rho = diag.spectral_radius(estimator, x[few])
    checks.append(
        diag.Check(
            "spectral_radius",
            diag.verdict(bool((rho >= 1).any())),
            f"spectral radius of J_f at z*: mean {rho.mean():.2f}, max {rho.max():.2f} "
            "(>= 1: the fixed point is not attracting for plain iteration)",
            {"per_sample": rho.tolist()},
        )
    )
    return checks
