"""The white-box evaluation protocol of Sec. 6.2-6.3, whole, in one call: ``evaluate_model``.

Named steps over one ``RunContext``:

0. ``eot_config`` (untimed): eight identical forwards of a few test samples; if they differ (a
   randomized model) and ``eot_draws`` is 1, every gradient column and measurement PGD runs
   with ``randomized_eot_draws`` draws per step (expectation over transformation).
1. ``early_exit``: on the development split, the ready-made PGD (training gradient) scores
   every iterate z_n; the early exit n* is the most robust one (ties: the best clean accuracy,
   then the latest; chosen once, then fixed).
2. ``sweep``: on the development split, the sweep of intermediate attacks over every
   registered family, each planned for the model's solver (e.g. over Anderson the adjoint
   steps with B = -I); per family the candidate with the largest drop of Early(n*) is chosen.
3. ``clean``: the test split's clean correctness per defense and per iterate.
4. ``columns``: the attack columns (``EvaluationConfig.attacks`` with the ready-made, Exact,
   chosen intermediate and ensemble estimates, BPTT, ``extra_estimates``): in table mode every
   column on every sample; in cascade mode per defense strongest first on the samples still
   robust (``cascade``; its ``order`` runs, the development PGD accuracy of each estimate, are
   made inside this step and only where some sample is still robust).
5. ``measurements``: the runs the diagnostics need (PGD-``long_steps``, large eps, batch
   dependence, gradient health, Exact backward, alignment, spectral radius; with bf16 attacks
   the ready-made PGD again in fp32).
6. ``diagnostics``: checks that judge those numbers.
7. ``entropy_defense`` (with ``EvaluationConfig.entropy_defense``; it runs after the columns,
   before the measurements): the follow-up's input-entropy-reduction defense on the test
   split (``evaluate_entropy_defense``, under the run's threat model and seed): its authors'
   non-adaptive column and the adaptive ones, block by block. Reported beside the readouts, it
   does not count in the white-box robustness.

Every finished step and every finished block of an attack is stored under a fingerprint of
the settings, the weights and the data; a rerun resumes from it (a finished run computes
nothing; a store of other settings, weights or data is moved aside, and one process at a time
writes a store). Under ``torchrun`` the samples are sharded by block. Unconverged forwards are
counted per call site and the run warns once; its ``ConvergenceLog`` records (added to those
of earlier finished runs of the same store) go into the report.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deq_attacks.adversarial import DefendedModel, as_defended
from deq_attacks.deq.convergence import ConvergenceLog
from deq_attacks.deq.entropy import InputEntropyReduction
from deq_attacks.deq.readout import Early, Ensemble, Final, Readout
from deq_attacks.evaluation.aggregate import choose_early_exit, tied_best
from deq_attacks.evaluation.attacks import Column, StandardAutoAttack
from deq_attacks.evaluation.cascade import DevStrengths, cascade_cells
from deq_attacks.evaluation.cells import Cells
from deq_attacks.evaluation.columns import BPTT, protocol_columns, protocol_estimates
from deq_attacks.evaluation.context import RunContext, check_split
from deq_attacks.evaluation.cost import (
    UnitCostProbe,
    UnitCosts,
    column_cost,
    counting_f,
    describe_cost,
    expected_costs,
    seconds_per_f,
)
from deq_attacks.evaluation.diagnostics import eot_draws_for, judge
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.entropy_defense import (
    EntropyDefenseResult,
    check_defendable,
    defense_settings,
    evaluate_entropy_defense,
)
from deq_attacks.evaluation.measurements import measure, repeated_forwards
from deq_attacks.evaluation.result import EvaluationReport, RunRecord, build_report
from deq_attacks.evaluation.scores import Development, Scores, SweepResult
from deq_attacks.evaluation.settings import ENTROPY_FIELDS, EvaluationConfig, Mode
from deq_attacks.evaluation.shared_runs import clean_scores, shared_pgd_scores
from deq_attacks.evaluation.store import ResultStore, data_hash, weights_hash
from deq_attacks.evaluation.sweep import run_sweep
from deq_attacks.evaluation.verdict import verdict_cells
from deq_attacks.gradients import BackpropThroughSolver, GradientEstimate, estimate_spec, ready_made
from deq_attacks.interfaces import DEQEstimator
from deq_attacks.records import to_jsonable


def evaluate_model(
    estimator: DEQEstimator,
    test: tuple[np.ndarray, np.ndarray],
    development: tuple[np.ndarray, np.ndarray],
    config: EvaluationConfig | None = None,
    *,
    store_path: Path | None = None,
    extra_estimates: Mapping[str, GradientEstimate] | None = None,
    description: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> EvaluationReport:
    """Run the whole protocol (see the module docstring) and return its report.

    Args:
        estimator: the model, an ART front end: read once into the protocol's defended model
            (``DefendedModel.of``), on which every step runs; never changed (each step
            attacks a view of it).
        test: images (S, C, H, W) float32 in [0, 1] and labels (S,).
        development: the split for n*, the sweep and the cascade's order (held out from
            training and test).
        config: the settings (default ``EvaluationConfig()``).
        store_path: the store of finished steps and blocks to resume from and append to (its
            own file: not the report's ``results.json``).
        extra_estimates: more gradient columns by label (registered estimates, recorded as
            specs).
        description: what is evaluated (model name, checkpoint...), stored in the settings.
        progress: callable(str) told of each step (e.g. print); None is silent.
    """
    config = config or EvaluationConfig()
    (x, y), (x_dev, y_dev) = test, development
    model = DefendedModel.of(estimator)  # refuses what the attacks cannot differentiate
    check_split("test", x, y, model)
    check_split("development", x_dev, y_dev, model)
    entropy = config.entropy_settings
    if entropy is not None:
        check_defendable(model, entropy)
    extras = dict(extra_estimates or {})
    for label, estimate in extras.items():
        if not isinstance(estimate, GradientEstimate):
            raise TypeError(f"extra estimate {label!r} is not a GradientEstimate: {estimate!r}")
        try:
            estimate_spec(estimate)
        except ValueError as error:
            raise ValueError(f"extra estimate {label!r}: {error}") from None
    deq = model.deq
    shards = Shards.current(config.attack_batch(model.device))
    settings = to_jsonable(config)
    if config.norm == "Linf":  # added later: left out at its default, earlier stores resume
        del settings["norm"]
    if not config.entropy_defense:  # the same
        for name in ("entropy_defense", *(f"entropy_{n}" for n in ENTROPY_FIELDS)):
            del settings[name]
    fingerprint = {
        "config": settings,
        "batch_size": shards.block_size,
        "weights": weights_hash(deq),
        "data": data_hash(x, y, x_dev, y_dev),
        "solver": repr(deq.solver),
        "training_gradient": repr(deq.training_gradient),
        "extra_estimates": {k: estimate_spec(v) for k, v in extras.items()},
        "description": dict(description or {}),
    }
    store = ResultStore(store_path, fingerprint, shards)
    say = progress or (lambda _text: None)
    for problem in store.problems:
        say(f"{store_path}: {problem}; dropped, its step is recomputed")
    if store.resumed:
        say(f"resuming from {store_path}")
    elif store.replaced:
        say(
            f"starting afresh: {store_path} held results for other "
            f"{', '.join(store.replaced)}; they are kept in {store.moved_to}"
        )
    with store:
        cost = estimate_cost(model, (x, y), (x_dev, y_dev), config, extras, shards.block_size)
        if cost["countable"]:
            expected = describe_cost(cost["steps"], cost["seconds_per_f"])
            say("expected cost before the work:\n" + expected)
        else:
            say("expected cost unknown: the model has no f module whose evaluations can be counted")
        with ConvergenceLog() as log, counting_f(deq) as f_count:
            ctx = RunContext(
                model, x, y, x_dev, y_dev, config, store, shards, say, log,
                ready_made(deq.training_gradient), f_count=f_count,
            )  # fmt: skip
            config = ctx.config = eot_config(ctx)
            with ctx.step("early_exit"):
                dev = early_exit(ctx)
            defenses: dict[str, Readout] = {
                "final": Final(),
                "early": Early(dev.early_exit),
                "ensemble": Ensemble(),
            }
            with ctx.step("sweep"):
                sweep = sweep_step(ctx, defenses)
            estimates = protocol_estimates(
                ctx.ready, sweep.chosen, {**yardstick(config), **extras}
            )
            columns = protocol_columns(estimates, config)
            with ctx.step("clean"):
                clean = clean_step(ctx, defenses)
            audits: dict[str, dict[str, Any]] = {}
            if config.mode is Mode.CASCADE:
                strengths = DevStrengths(ctx, estimates, defenses, dev, sweep)
                with ctx.step("columns"):  # its ordering runs, timed as "order" too, are inside
                    cells = cascade_cells(ctx, columns, defenses, clean, strengths)
            elif config.mode is Mode.VERDICT:
                strengths = DevStrengths(ctx, estimates, defenses, dev, sweep)
                costs = column_costs(model, columns, config, (x_dev, y_dev), cost["units"])
                with ctx.step("columns"):  # the cover and the audit, timed on their own too
                    cells, audits = verdict_cells(ctx, columns, defenses, clean, strengths, costs)
            else:  # table mode: every column on every sample, in one loop (no frame between)
                cells = Cells.table(defenses, columns)
                with ctx.step("columns"):
                    for column in columns:
                        how = "one run for" if column.shared else "against"
                        ctx.say(f"test split: {column.label} ({how} {', '.join(defenses)})")
                        scores = ctx.run_column(column, defenses, np.arange(len(x)))
                        cells.add_column(column, scores, ctx.is_ready(column))
            entropy_result = None
            if entropy is not None:
                with ctx.step("entropy_defense"):
                    entropy_result = entropy_defense_step(ctx, entropy)
            with ctx.step("measurements"):
                measured = measure(ctx, estimates, defenses)
            checks = judge(ctx, defenses, columns, cells, clean, measured)
            convergence = merged(store.get("convergence") or [], log.records)
            store.put("convergence", convergence)
    record = RunRecord(
        fingerprint, dev, defenses, sweep, estimates, columns, clean, cells, checks,
        convergence, audits, cost, entropy_result,
    )  # fmt: skip
    return build_report(ctx, record)


def eot_config(ctx: RunContext) -> EvaluationConfig:
    """The config of the gradient columns and measurements: ``eot_draws`` raised to
    ``randomized_eot_draws`` when eight identical forwards of the first ``diagnostic_samples``
    test samples differ (``diagnostics.eot_draws_for``); the decision is stored."""
    config = ctx.config
    numbers = ctx.store.get("randomness")
    if numbers is None:
        few = slice(0, min(config.diagnostic_samples, len(ctx.x)))
        numbers = repeated_forwards(ctx.model, ctx.x[few], ctx.batch)
        draws, switched = eot_draws_for(config, numbers)
        decision = {"eot_draws": draws, "switched_on": switched}
        numbers = ctx.store.put("randomness", {**numbers, **decision})
    if numbers["switched_on"]:
        ctx.say(
            "randomized output (identical forwards differ by "
            f"{numbers['relative_difference']:.1e}): EOT on, {numbers['eot_draws']} draws per "
            "gradient step"
        )
    return dataclasses.replace(config, eot_draws=int(numbers["eot_draws"]))


EARLY_CLEAN_GAP = 0.1
"""An early exit whose clean development accuracy is below the last iterate's by more than
this warns (its robustness is that of a weaker classifier)."""


def estimate_cost(
    model: DefendedModel | DEQEstimator,
    test: tuple[np.ndarray, np.ndarray],
    development: tuple[np.ndarray, np.ndarray],
    config: EvaluationConfig,
    extra_estimates: Mapping[str, GradientEstimate] | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """The expected f evaluations of each step of ``evaluate_model`` with these arguments
    (``cost.expected_costs``) and the wall seconds per f evaluation from one timed batch of
    ``batch`` development images (default: the attack batch): ``{"steps", "unknown_columns",
    "bound", "seconds_per_f", "expected_wall_s"}``."""
    x_dev, y_dev = development
    defended = as_defended(model)
    cost = expected_costs(defended, config, development, len(test[0]), extra_estimates)
    if not cost["countable"]:
        return {**cost, "seconds_per_f": None, "expected_wall_s": None}
    size = batch or config.attack_batch(defended.device)
    seconds = seconds_per_f(
        defended, ready_made(defended.deq.training_gradient), x_dev[:size], y_dev[:size]
    )
    cost["seconds_per_f"] = seconds
    cost["expected_wall_s"] = sum(cost["steps"].values()) * seconds
    return cost


def column_costs(
    model: DefendedModel,
    columns: Sequence[Column],
    config: EvaluationConfig,
    development: tuple[np.ndarray, np.ndarray],
    known: Mapping[str, Sequence[float]],
) -> dict[str, float | None]:
    """Column label -> f evaluations per sample of one run (``cost.column_cost``), from the
    unit costs ``known`` by estimate repr (``estimate_cost``'s, counted before the run), else
    counted on two development images."""
    probe = UnitCostProbe(model, development[0][:2], development[1][:2])
    units = {}
    for column in columns:
        key = repr(column.estimate)
        units[key] = UnitCosts(*known[key]) if key in known else probe(column.estimate)
    return {
        c.label: column_cost(c, config.threat, model.nb_classes, units[repr(c.estimate)])
        for c in columns
    }


def early_exit(ctx: RunContext) -> Development:
    """n* by the ready-made PGD on the development split: the iterate with the best accuracy
    (ties: the best clean accuracy among them, then the latest; ``choose_early_exit``), the
    tied iterates and how far n*'s clean accuracy is below the last iterate's (above
    ``EARLY_CLEAN_GAP`` it warns); with the per-iterate clean and PGD accuracy, the
    residuals, and the PGD accuracy of the final and ensemble defenses (the cascade's
    order)."""
    dev = ctx.store.get("development")
    if dev is not None:
        return Development(**dev)
    ctx.say("development split: ready-made PGD over every iterate")
    scored: dict[str, Readout] = {"final": Final(), "ensemble": Ensemble()}
    attacked = shared_pgd_scores(
        ctx.model, ctx.ready, ctx.x_dev, ctx.y_dev, ctx.threat, scored, ctx.shards,
        seed=ctx.config.seed,
    )  # fmt: skip
    clean = clean_scores(ctx.model, ctx.x_dev, ctx.y_dev, {"final": Final()}, ctx.shards)
    assert attacked.states is not None and clean.residuals is not None
    clean_accuracy = clean.per_state()
    n_star = choose_early_exit(attacked.states, clean_accuracy)
    gap = float(clean_accuracy[-1] - clean_accuracy[n_star - 1])
    if gap > EARLY_CLEAN_GAP:
        message = (
            f"the early exit z_{n_star} classifies {100 * gap:.1f} points fewer clean "
            f"development images than the last iterate ({100 * clean_accuracy[n_star - 1]:.1f} "
            f"vs {100 * clean_accuracy[-1]:.1f}%): its robustness is that of a weaker classifier"
        )
        warnings.warn(message, stacklevel=2)
        ctx.say(f"warning: {message}")
    found = Development(
        early_exit=int(n_star),
        early_exit_tied=tied_best(attacked.states),
        early_exit_clean_gap=gap,
        pgd_accuracy_per_state=attacked.per_state().tolist(),
        clean_accuracy_per_state=clean_accuracy.tolist(),
        residual_per_state=clean.residuals.mean(0).tolist(),
        pgd_accuracy={d: attacked.accuracy(d) for d in scored},
    )
    return Development(**ctx.store.put("development", dataclasses.asdict(found)))


def sweep_step(ctx: RunContext, defenses: Mapping[str, Readout]) -> SweepResult:
    """The sweep of intermediate attacks on the development split (``run_sweep``), each
    finished candidate stored."""
    done = dict(ctx.store.get("sweep") or {})

    def keep(entry: dict[str, Any]) -> None:
        done[entry["estimate"]] = entry
        ctx.store.put("sweep", done)

    ctx.say("development split: sweep of intermediate attacks")
    return run_sweep(
        ctx.model, ctx.config.sweep, ctx.x_dev, ctx.y_dev, ctx.threat, defenses, "early",
        ctx.shards, seed=ctx.config.seed, done=done, on_entry=keep, progress=ctx.say,
        mode=ctx.config.sweep_mode,
    )  # fmt: skip


def clean_step(ctx: RunContext, defenses: Mapping[str, Readout]) -> Scores:
    """Clean correctness of every defense and iterate on the test split, and residuals."""
    done = ctx.store.get("clean")
    if done is None:
        scores = clean_scores(ctx.model, ctx.x, ctx.y, defenses, ctx.shards)
        done = ctx.store.put("clean", scores.arrays())
    return Scores.from_arrays(done)


def entropy_defense_step(
    ctx: RunContext, defense: InputEntropyReduction
) -> EntropyDefenseResult:
    """The input-entropy-reduction defense on the test split (``evaluate_entropy_defense``)
    under the run's threat model and seed, block by block (each finished block stored); the
    adaptive AutoAttack runs when ``autoattack`` is among the run's attacks, with its budgets.
    Its attacks take single-draw gradients: on a randomized model (EOT on) its settings say
    so."""
    config = ctx.config
    standard = [a for a in config.attack_specs if isinstance(a, StandardAutoAttack)]
    autoattack = standard[0].settings if standard else None
    craft = BackpropThroughSolver()

    def block(index: np.ndarray) -> dict[str, np.ndarray]:
        result = evaluate_entropy_defense(
            ctx.model, ctx.x[index], ctx.y[index], ctx.threat, defense,
            craft_estimate=craft, autoattack=autoattack, seed=config.seed,
            batch_size=ctx.batch, progress=ctx.say, index=index,
        )  # fmt: skip
        return {"index": index, **result.correct}

    ctx.say("test split: the input-entropy-reduction defense, non-adaptive and adaptive")
    found = ctx.blockwise("entropy_defense", block, np.arange(len(ctx.x)))
    correct = {k: v.astype(bool) for k, v in found.items() if k != "index"}
    settings = defense_settings(ctx.threat, defense, craft, autoattack, config.seed, len(ctx.x))
    if config.eot_draws > 1:
        settings["eot"] = (
            f"not applied: the run's gradient columns average {config.eot_draws} draws, but "
            "the defense's attacks take single-draw gradients; on a randomized model its "
            "accuracies may overstate robustness"
        )
    return EntropyDefenseResult(correct, settings)


def merged(
    earlier: list[dict[str, Any]], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """ConvergenceLog records of earlier finished sessions of this store and of this one, per
    call site (counts added, the worst residual kept)."""
    sites = {r["site"]: dict(r) for r in earlier}
    for record in records:
        known = sites.setdefault(record["site"], dict(record, **_zero_counts()))
        for name in _zero_counts():
            known[name] += record[name]
        worst = [w for w in (known["worst_residual"], record["worst_residual"]) if w is not None]
        known["worst_residual"] = max(worst) if worst else None
    return list(sites.values())


def _zero_counts() -> dict[str, int]:
    names = ("calls", "unconverged_calls", "samples", "samples_above", "samples_nonfinite")
    return dict.fromkeys(names, 0)


def yardstick(config: EvaluationConfig) -> dict[str, GradientEstimate]:
    """The BPTT column (the true gradient of the defended logits), unless switched off."""
    if not config.bptt:
        return {}
    return {BPTT: BackpropThroughSolver(checkpoint=config.bptt_checkpoint)}
