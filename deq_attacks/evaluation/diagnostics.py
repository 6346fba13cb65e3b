"""Diagnostics with verdicts: each check says "pass" or "flag" and gives its numbers.

Signals of gradient obfuscation (Athalye et al. 2018; Carlini et al. 2019; Croce & Hein 2020's
flags), the indicators of attack failure (Pintor et al. 2022: silent success, incomplete
optimisation, unstable predictions, transfer failure, the unconstrained attack), Carlini et
al.'s random-noise baseline, AutoAttack's dynamic-defense check, and signals of an unreliable
forward or backward solve, per sample where the check is per sample.
A check judges the numbers it is given (the protocol's cells and ``measurements``); it runs no
attack and computes no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deq_attacks.deq.convergence import RESIDUAL_LIMIT
from deq_attacks.evaluation.settings import EvaluationConfig, Mode

if TYPE_CHECKING:
    from deq_attacks.deq.readout import Readout
    from deq_attacks.evaluation.attacks import Column
    from deq_attacks.evaluation.cells import Cells
    from deq_attacks.evaluation.context import RunContext
    from deq_attacks.evaluation.scores import Scores

BACKWARD_RESIDUAL_LIMIT = 0.05
"""Relative residual above which an Exact backward (adjoint) solve counts as not converged."""
SCALE_COSINE_LIMIT = 0.99
"""An Exact gradient whose direction changes more than this when only the loss scale changes
(cosine below it) is arbitrary."""
SQUARE_MARGIN = 0.002
"""AutoAttack's check_square_sr margin: Square beating the gradient attacks by more flags."""
LARGE_EPS_LIMIT = 0.05
"""Accuracy at a large eps above this flags (it should fall to about 0)."""
ACCUMULATION_MARGIN = 0.02
"""An iterate more robust than the last one by more than this flags robustness accumulation."""


@dataclass
class Check:
    """One diagnostic: its verdict ("pass" or "flag"), a sentence, and its numbers."""

    name: str
    verdict: str
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verdict(flagged: bool) -> str:
    return "flag" if flagged else "pass"


def square_check(column_accuracy: Mapping[str, Mapping[str, float]], square: str) -> Check:
    """Per defense: does Square (a query attack) beat every gradient attack?"""
    beaten = {}
    for defense, cells in column_accuracy.items():
        gradient = [v for k, v in cells.items() if k != square]
        if square in cells and gradient and cells[square] < min(gradient) - SQUARE_MARGIN:
            beaten[defense] = {"square": cells[square], "best_gradient": min(gradient)}
    message = (
        "Square beats every gradient attack for "
        + ", ".join(
            f"{d} ({100 * v['square']:.1f} < {100 * v['best_gradient']:.1f}%)"
            for d, v in beaten.items()
        )  # fmt: skip
        + ": the gradients are obfuscated"
        if beaten
        else "Square beats no defense's best gradient attack"
    )
    return Check("square_beats_gradient", verdict(bool(beaten)), message, {"defenses": beaten})


def more_steps_check(
    short: Mapping[str, np.ndarray], long: Mapping[str, np.ndarray], steps: tuple[int, int]
) -> Check:
    """Per defense: does PGD with more steps leave accuracy higher (per-sample survival)?"""
    numbers = {}
    flagged = False
    for defense in short:
        a, b = float(short[defense].mean()), float(long[defense].mean())
        only_long = int((long[defense] & ~short[defense]).sum())
        numbers[defense] = {
            f"pgd{steps[0]}": a,
            f"pgd{steps[1]}": b,
            "survive_long_only": only_long,
        }
        flagged |= b > a
    pairs = ", ".join(
        f"{d} {100 * v[f'pgd{steps[0]}']:.1f} -> {100 * v[f'pgd{steps[1]}']:.1f}%"
        for d, v in numbers.items()
    )
    message = (
        f"PGD-{steps[1]} leaves a higher accuracy than PGD-{steps[0]} ({pairs}): the attack "
        "does not converge, or the loss surface misleads it"
        if flagged
        else f"PGD-{steps[1]} is at most PGD-{steps[0]} for every defense ({pairs})"
    )
    return Check("more_steps_lower_accuracy", verdict(flagged), message, numbers)


def large_eps_check(scores: Mapping[str, np.ndarray], eps: float) -> Check:
    """At a large eps, does the accuracy fall to about 0 for every defense? (Pintor et al.'s
    unconstrained-attack indicator: an attack that cannot break the model with a budget this
    large is failing, not meeting a robust model.)"""
    numbers = {d: float(v.mean()) for d, v in scores.items()}
    high = {d: a for d, a in numbers.items() if a > LARGE_EPS_LIMIT}
    accuracies = ", ".join(f"{d} {100 * a:.1f}%" for d, a in numbers.items())
    message = (
        f"accuracy stays above {LARGE_EPS_LIMIT:.0%} at eps={eps} ({accuracies}): the "
        "unconstrained attack fails, so the attack, not the model, is at fault"
        if high
        else f"accuracy falls to <= {LARGE_EPS_LIMIT:.0%} at eps={eps} ({accuracies})"
    )
    return Check("large_eps_accuracy", verdict(bool(high)), message, {"eps": eps, **numbers})


def accumulation_check(state_correct: np.ndarray, margin: float = ACCUMULATION_MARGIN) -> Check:
    """Robustness accumulation (Fig. 2a): is an intermediate iterate more robust than the last
    one under the ready-made attack? ``state_correct`` bool (S, N)."""
    accuracy = state_correct.mean(axis=0)
    best = int(np.argmax(accuracy)) + 1
    flagged = bool(accuracy.max() > accuracy[-1] + margin)
    message = (
        f"z_{best} is more robust ({100 * accuracy.max():.1f}%) than the last iterate "
        f"({100 * accuracy[-1]:.1f}%) under the ready-made attack: the ready-made gradient "
        "does not reach the intermediate states"
        if flagged
        else f"no iterate is more robust than the last one by over {100 * margin:.0f} points"
    )
    return Check(
        "robustness_accumulation", verdict(flagged), message, {"per_state": accuracy.tolist()}
    )


def forward_convergence_check(final_residual: np.ndarray) -> Check:
    """Samples whose forward solve ended above the residual limit (per sample)."""
    bad = np.flatnonzero(final_residual > RESIDUAL_LIMIT)
    numbers = {
        "limit": RESIDUAL_LIMIT,
        "mean_residual": float(final_residual.mean()),
        "max_residual": float(final_residual.max()),
        "samples": bad.tolist(),
    }
    message = (
        f"{len(bad)} of {len(final_residual)} samples' forward solves ended above a relative "
        f"residual of {RESIDUAL_LIMIT} (mean {final_residual.mean():.3f}, max "
        f"{final_residual.max():.3f})"
    )
    return Check("forward_not_converged", verdict(bool(len(bad))), message, numbers)


#: Relative logit difference (alone vs in a batch) counted as batch dependence, per device
#: type: float32 CPU kernels agree to about 1e-6; GPU kernels (TF32, algorithms chosen by batch
#: size) differ by about 1e-4 (measured 1.5e-4 on an H100) for identical inputs.
BATCH_TOLERANCE = {"cpu": 1e-4, "cuda": 2e-3}
PRECISION_MARGIN = 0.02
"""bf16 attacks whose accuracy differs from the same attack in fp32 by more than this flag."""


RANDOMNESS_TOLERANCE = 1e-6
"""Relative logit difference between two identical forwards above which the output counts as
randomized."""


def eot_draws_for(config: EvaluationConfig, numbers: Mapping[str, Any]) -> tuple[int, bool]:
    """The EOT draws of the gradient columns and whether they were switched on: the config's
    ``eot_draws``, or ``randomized_eot_draws`` when it is 1 and two identical forwards differed
    (``measurements.repeated_forwards``)."""
    randomized = numbers["relative_difference"] > RANDOMNESS_TOLERANCE
    if randomized and config.eot_draws == 1 and config.randomized_eot_draws > 1:
        return config.randomized_eot_draws, True
    return config.eot_draws, False


def batch_and_randomness_check(
    numbers: Mapping[str, Any], randomness: Mapping[str, Any] | None = None
) -> tuple[Check, Check]:
    """Does a sample's output depend on its batch (alone vs together, beyond the device's
    float tolerance ``BATCH_TOLERANCE``, or any prediction changes)? Do repeated forwards
    differ? ``numbers``: ``measurements.batch_outputs``; ``randomness``: the protocol's check
    before the columns (``repeated_forwards`` with ``eot_draws`` and ``switched_on``), whose
    EOT decision the randomness check reports."""
    device = numbers["device"]
    tolerance = BATCH_TOLERANCE.get(device, max(BATCH_TOLERANCE.values()))
    batch_diff, flips = numbers["relative_difference"], numbers["prediction_changes"]
    random_diff = numbers["repeat_difference"]
    batch = Check(
        "output_depends_on_batch",
        verdict(flips > 0 or batch_diff > tolerance),
        f"relative logit difference alone vs in a batch {batch_diff:.1e} (tolerance "
        f"{tolerance:.0e} on {device}), {flips} predictions change",
        {
            "relative_difference": batch_diff,
            "prediction_changes": flips,
            "samples": numbers["samples"],
            "tolerance": tolerance,
        },  # fmt: skip
    )
    random_numbers: dict[str, Any] = {"relative_difference": random_diff}
    message = f"relative logit difference between two identical forwards {random_diff:.1e}"
    if randomness is not None:
        random_diff = max(random_diff, randomness["relative_difference"])
        random_numbers = {**random_numbers, "before_columns": dict(randomness)}
        draws = randomness["eot_draws"]
        if randomness["switched_on"]:
            message += (
                f" ({randomness['relative_difference']:.1e} before the columns, "
                f"{randomness['prediction_changes']} of {randomness['samples']} predictions "
                f"changed): EOT switched on, every gradient column averaged its gradient over "
                f"{draws} draws per step"
            )
        elif draws > 1:
            message += f"; every gradient column averaged its gradient over {draws} draws"
    random = Check(
        "randomized_output",
        verdict(random_diff > RANDOMNESS_TOLERANCE),
        message,
        random_numbers,
    )
    return batch, random


def gradient_health_check(numbers: Mapping[str, Mapping[str, list[int]]]) -> Check:
    """Per estimate: samples whose loss gradient is zero or not finite at the clean input, or
    not finite at a point of the eps ball around it (``measurements.gradient_health``)."""
    flagged = any(
        v["zero"] or v["not_finite"] or v.get("not_finite_near") for v in numbers.values()
    )
    counts = ", ".join(
        f"{k}: {len(v['zero'])} zero / {len(v['not_finite'])} NaN-inf"
        + (f" / {len(v['not_finite_near'])} NaN-inf near" if "not_finite_near" in v else "")
        for k, v in numbers.items()
    )
    return Check("zero_or_nan_gradients", verdict(flagged), counts, dict(numbers))


def nonfinite_logits_check(
    clean: Mapping[str, np.ndarray], columns: Mapping[str, Mapping[str, int]]
) -> Check:
    """Per defense: how many samples' defended logits held a NaN or an infinity, clean
    (``clean``: defense -> bool (S,) finite) and under each column (``Cells.nonfinite``).
    Such samples count as not robust (``scoring.correct``); any of them flags the model."""
    numbers: dict[str, dict[str, int]] = {}
    for d, finite in clean.items():
        numbers[d] = {"clean": int((~np.asarray(finite, dtype=bool)).sum())}
        numbers[d].update(columns.get(d, {}))
    bad = {d: {c: k for c, k in row.items() if k} for d, row in numbers.items()}
    bad = {d: row for d, row in bad.items() if row}
    message = (
        "defended logits are NaN or infinite (counted not robust) for "
        + "; ".join(
            f"{d}: " + ", ".join(f"{c} {k}" for c, k in row.items()) for d, row in bad.items()
        )
        if bad
        else "every defended logit is finite, clean and under every column"
    )
    return Check("nonfinite_logits", verdict(bool(bad)), message, numbers)


def exact_backward_check(numbers: Mapping[str, list[float]]) -> Check:
    """Per sample: did the Exact backward solve converge, and does the Exact gradient keep its
    direction when only the loss scale changes (x1 vs x1e-3)? Either failing makes that
    sample's Exact gradient arbitrary (``measurements.exact_backward``)."""
    residual = np.asarray(numbers["backward_residual"], dtype=float)
    cosine = np.asarray(numbers["scale_cosine"], dtype=float)
    unconverged = np.flatnonzero(residual > BACKWARD_RESIDUAL_LIMIT)
    unstable = np.flatnonzero(cosine < SCALE_COSINE_LIMIT)
    arbitrary = sorted(set(unconverged.tolist()) | set(unstable.tolist()))
    message = (
        f"{len(unconverged)} of {len(residual)} samples' Exact backward solves did not converge "
        f"(residual > {BACKWARD_RESIDUAL_LIMIT}, max {residual.max():.2g}), {len(unstable)} "
        f"change direction with the loss scale (cosine < {SCALE_COSINE_LIMIT}, min "
        f"{cosine.min():.3f})"
        + (f": the Exact gradients of samples {arbitrary} are arbitrary" if arbitrary else "")
    )
    numbers = {
        "backward_residual": residual.tolist(),
        "scale_cosine": cosine.tolist(),
        "arbitrary_samples": arbitrary,
    }
    return Check("exact_backward_not_converged", verdict(bool(arbitrary)), message, numbers)


def spectral_radius_check(rho: np.ndarray) -> Check:
    """Samples whose spectral radius of J_f at z* is >= 1 (``measurements.spectral_radii``)."""
    rho = np.asarray(rho, dtype=float)
    return Check(
        "spectral_radius",
        verdict(bool((rho >= 1).any())),
        f"spectral radius of J_f at z*: mean {rho.mean():.2f}, max {rho.max():.2f} "
        "(>= 1: the fixed point is not attracting for plain iteration)",
        {"per_sample": rho.tolist()},
    )


def square_first_check(broken_first: Mapping[str, int], robust: Mapping[str, int], n: int) -> Check:
    """Cascade mode (Square runs last, on the samples every gradient column left robust): per
    defense, how many samples Square alone broke; more than ``SQUARE_MARGIN`` of the samples
    flags obfuscated gradients."""
    beaten = {d: k for d, k in broken_first.items() if k / n > SQUARE_MARGIN}
    message = (
        "Square broke samples that every gradient attack left robust: "
        + ", ".join(f"{d} {k} of {n}" for d, k in beaten.items())
        + ": the gradients are obfuscated"
        if beaten
        else "Square broke "
        + ", ".join(f"{d} {k}" for d, k in broken_first.items())
        + f" of {n} samples that every gradient attack left robust"
    )
    numbers = {"broken_by_square": dict(broken_first), "robust": dict(robust), "samples": n}
    return Check("square_beats_gradient", verdict(bool(beaten)), message, numbers)


def precision_check(bf16: Mapping[str, float], fp32: Mapping[str, float], column: str) -> Check:
    """bf16 attacks: does ``column`` in bf16 leave an accuracy within ``PRECISION_MARGIN`` of
    the same column run in fp32 on the same images, for every defense?"""
    gaps = {d: bf16[d] - fp32[d] for d in bf16}
    flagged = any(abs(g) > PRECISION_MARGIN for g in gaps.values())
    pairs = ", ".join(f"{d} {100 * bf16[d]:.1f} vs {100 * fp32[d]:.1f}%" for d in bf16)
    message = f"{column} in bf16 vs fp32: {pairs}" + (
        f" (differs by more than {100 * PRECISION_MARGIN:.0f} points)" if flagged else ""
    )
    numbers = {"column": column, "bf16": dict(bf16), "fp32": dict(fp32)}
    return Check("bf16_vs_fp32", verdict(flagged), message, numbers)


ALIGNMENT_LIMIT = 0.9
"""A ready-made gradient whose median cosine with the true gradient is below this is flagged."""


def alignment_check(
    numbers: Mapping[str, Mapping[str, Any]], ready_label: str = "ready-made"
) -> Check:
    """Judge the alignment measured per defense (``AlignmentResult.to_json()`` by defense name):
    flags a defense whose ready-made gradient has a median cosine with the true gradient below
    ``ALIGNMENT_LIMIT`` (the attack a user would run follows an obfuscated gradient)."""
    flagged: dict[str, float | None] = {}
    for name, result in numbers.items():
        ready = result["estimates"].get(ready_label)
        if ready is not None and (ready["median"] is None or ready["median"] < ALIGNMENT_LIMIT):
            flagged[name] = ready["median"]
    summary = "; ".join(
        f"{name}: "
        + ", ".join(
            f"{label} {_fmt(entry['median'])}/{_fmt(entry['worst'])}"
            for label, entry in result["estimates"].items()
        )
        for name, result in numbers.items()
    )
    samples = next(iter(numbers.values()))["num_samples"] if numbers else 0
    message = f"cosine with the true gradient (median/worst over {samples} samples) - {summary}" + (
        f"; the ready-made gradient is misaligned (median < {ALIGNMENT_LIMIT}) for "
        + ", ".join(flagged)
        if flagged
        else ""
    )
    return Check("gradient_alignment", verdict(bool(flagged)), message, dict(numbers))


INCOMPLETE_MARGIN = 0.05
"""A sample whose attack loss reaches a new best in the last fifth of the steps, by more than
this fraction of its loss range, is still being optimised when the attack stops."""


def silent_success_check(
    path: Mapping[str, list[list[Any]]], reported: Mapping[str, Mapping[str, list[int]]]
) -> Check:
    """Silent success (Pintor et al. 2022): the ready-made PGD's path passed a point the
    defended model misclassifies but ended at one it classifies correctly (``path``:
    ``measurements.attack_path``); and, per column that records its own verdict (AutoAttack's
    survival), samples whose recorded verdict and the protocol's scoring of the same example
    disagree (``reported``: column key -> ``{"reported_broken_scored_correct": [...],
    "reported_robust_scored_wrong": [...]}``)."""
    correct = np.asarray(path["correct"], dtype=bool)
    silent = np.flatnonzero((~correct[:, :-1]).any(axis=1) & correct[:, -1]).tolist()
    disagree = {k: v for k, v in reported.items() if any(v.values())}
    parts = [
        f"{len(silent)} of {len(correct)} samples' ready-made PGD path crossed a misclassified "
        f"point but ended correct ({correct.shape[1] - 1} steps)"
    ]
    if disagree:
        parts.append(
            "the attack's own verdict and the scoring disagree for "
            + ", ".join(f"{k} ({sum(map(len, v.values()))})" for k, v in disagree.items())
        )
    flagged = bool(silent or disagree)
    message = "; ".join(parts) + (": the attack returns the wrong point" if flagged else "")
    numbers = {"path_samples": silent, "steps": correct.shape[1] - 1, "columns": dict(reported)}
    return Check("silent_success", verdict(flagged), message, numbers)


def incomplete_optimisation_check(path: Mapping[str, list[list[Any]]]) -> Check:
    """Incomplete optimisation (Pintor et al. 2022): samples the ready-made PGD left correct
    whose loss still reached a new best in the last fifth of the steps (by more than
    ``INCOMPLETE_MARGIN`` of the sample's loss range): more steps would have gone further."""
    loss = np.asarray(path["loss"], dtype=float)
    correct = np.asarray(path["correct"], dtype=bool)
    steps = loss.shape[1] - 1
    tail = max(1, steps // 5)
    span = loss.max(axis=1) - loss.min(axis=1)
    gain = loss[:, -tail:].max(axis=1) - loss[:, :-tail].max(axis=1)
    rising = correct[:, -1] & (span > 0) & (gain > INCOMPLETE_MARGIN * span)
    samples = np.flatnonzero(rising).tolist()
    message = (
        f"{len(samples)} of {int(correct[:, -1].sum())} samples left correct by the ready-made "
        f"PGD-{steps} still raised their loss in the last {tail} steps (new best by over "
        f"{INCOMPLETE_MARGIN:.0%} of its range)"
        + (": the optimisation was incomplete; more steps or a larger step" if samples else "")
    )
    numbers = {"samples": samples, "steps": steps, "tail": tail, "gain": gain.tolist()}
    return Check("incomplete_optimisation", verdict(bool(samples)), message, numbers)


def unstable_predictions_check(numbers: Mapping[str, Any]) -> Check:
    """Unstable predictions (Pintor et al. 2022): a clean prediction that changes under
    uniform noise far below the eps (``measurements.unstable_predictions``)."""
    changes = np.asarray(numbers["changes"], dtype=int)
    samples = np.flatnonzero(changes > 0).tolist()
    message = (
        f"{len(samples)} of {len(changes)} clean predictions change under uniform noise of "
        f"{numbers['noise']:.2g} ({numbers['draws']} draws each)"
        + (": the output is unstable, so gradients are unreliable" if samples else "")
    )
    return Check(
        "unstable_predictions", verdict(bool(samples)), message,
        {**dict(numbers), "samples": samples},
    )  # fmt: skip


def noise_baseline_check(
    noise: Mapping[str, np.ndarray], robust: Mapping[str, np.ndarray], eps: float
) -> Check:
    """Carlini et al.'s random-noise baseline: per defense, samples that uniform noise at the
    eps misclassifies but every attack left robust (``robust``: the per-sample verdict); any
    means the attacks do worse than noise there."""
    numbers = {}
    for defense, survived in robust.items():
        beaten = np.flatnonzero(~noise[defense] & survived).tolist()
        numbers[defense] = {
            "noise_accuracy": float(noise[defense].mean()),
            "attack_accuracy": float(survived.mean()),
            "broken_by_noise_only": beaten,
        }
    flagged = [d for d, v in numbers.items() if v["broken_by_noise_only"]]
    pairs = ", ".join(
        f"{d} {100 * v['noise_accuracy']:.1f} vs {100 * v['attack_accuracy']:.1f}%"
        for d, v in numbers.items()
    )
    message = f"accuracy under uniform noise at eps={eps:g} vs under every attack: {pairs}" + (
        "; uniform noise breaks samples that every attack left robust for "
        + ", ".join(f"{d} ({len(numbers[d]['broken_by_noise_only'])})" for d in flagged)
        if flagged
        else ""
    )
    return Check("random_noise_baseline", verdict(bool(flagged)), message, {"eps": eps, **numbers})


def transfer_failure_check(
    transfer: Mapping[str, np.ndarray], white_box: Mapping[str, Mapping[str, np.ndarray]]
) -> Check:
    """Transfer attack beats white-box: per defense, samples the transfer column broke that
    every white-box gradient column left correct (``transfer``: defense -> its cells;
    ``white_box``: defense -> column -> cells; 1 correct, 0 broken)."""
    numbers = {}
    for defense, cells in transfer.items():
        columns = list(white_box[defense].values())
        held = np.all([c == 1 for c in columns], axis=0) if columns else np.ones_like(cells, bool)
        numbers[defense] = np.flatnonzero((cells == 0) & held).tolist()
    flagged = {d: v for d, v in numbers.items() if v}
    message = (
        "the transfer attack broke samples every white-box gradient attack left correct: "
        + ", ".join(f"{d} {len(v)}" for d, v in flagged.items())
        + ": the white-box gradients are obfuscated"
        if flagged
        else "the transfer attack broke no sample that every white-box gradient attack left "
        "correct"
    )
    return Check("transfer_beats_white_box", verdict(bool(flagged)), message, numbers)


def dynamic_defense_check(numbers: Mapping[str, Any]) -> Check:
    """AutoAttack's dynamic-defense check: gradient calls (``grad``, ``backward``,
    ``_make_grads``) inside one forward of the defended model (``measurements.dynamic_calls``)."""
    calls = dict(numbers["calls"])
    flagged = any(v > 0 for v in calls.values())
    message = (
        "gradient calls inside one forward of the defended model: "
        + ", ".join(f"{k} {v}" for k, v in calls.items())
        + (
            ": a dynamic defense; attack it adaptively (through its inner steps, BPDA, EOT)"
            if flagged
            else ""
        )
    )
    return Check("dynamic_defense", verdict(flagged), message, dict(numbers))


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]


def judge(
    ctx: RunContext,
    defenses: Mapping[str, Readout],
    columns: Sequence[Column],
    cells: Cells,
    clean: Scores,
    measured: Mapping[str, Any],
) -> list[Check]:
    """Every check of a run, from its cells and its measurements (``measurements.measure``)."""
    config = ctx.config
    checks = []
    square = next((c.label for c in columns if c.attack.name == "square"), None)
    if square is not None and config.mode is Mode.TABLE:
        accuracy = {
            d: {c: float(np.mean(v == 1)) for c, v in row.items()}
            for d, row in cells.survived.items()
        }
        checks.append(square_check(accuracy, square))
    elif square is not None:
        broken = {d: int((cells.survived[d][square] == 0).sum()) for d in defenses}
        robust = {d: int(v.sum()) for d, v in verdicts(cells, clean).items()}
        checks.append(square_first_check(broken, robust, len(ctx.x)))
    clean_ok = {d: clean.correct[d] for d in defenses}
    short = {d: cells.ready.correct[d] for d in defenses}
    long = {d: measured["long_pgd"][d] & clean_ok[d] for d in defenses}
    checks.append(more_steps_check(short, long, (config.steps, config.long_steps)))
    checks.append(large_eps_check(measured["large_eps"], config.large_eps))
    checks.append(accumulation_check(np.asarray(cells.ready.states, dtype=bool)))
    checks.append(forward_convergence_check(np.asarray(clean.residuals, dtype=float)[:, -1]))
    checks += batch_and_randomness_check(measured["batch"], measured.get("randomness"))
    finite = {d: clean.finite.get(d, np.ones(len(ctx.x), bool)) for d in defenses}
    checks.append(nonfinite_logits_check(finite, cells.nonfinite))
    checks.append(gradient_health_check(measured["gradients"]))
    checks.append(exact_backward_check(measured["exact_backward"]))
    if "alignment" in measured:
        checks.append(alignment_check(measured["alignment"]))
    checks.append(spectral_radius_check(np.asarray(measured["spectral_radius"])))
    checks += failure_indicators(ctx, defenses, columns, cells, clean, measured)
    if "fp32" in measured:
        bf16 = {d: float(short[d].mean()) for d in defenses}
        fp32 = {d: float(measured["fp32"][d].mean()) for d in defenses}
        checks.append(precision_check(bf16, fp32, measured["fp32_column"]))
    return checks


def failure_indicators(
    ctx: RunContext,
    defenses: Mapping[str, Readout],
    columns: Sequence[Column],
    cells: Cells,
    clean: Scores,
    measured: Mapping[str, Any],
) -> list[Check]:
    """The indicators of attack failure and the baselines, from the cells and measurements:
    silent success, incomplete optimisation, unstable predictions, the random-noise baseline,
    transfer beating white-box (with a transfer column) and the dynamic-defense check."""
    reported = {}
    for key, extra in cells.extras.items():
        defense, _, column = key.partition("/")
        final = extra.get("after/square")
        if final is None or column not in cells.survived.get(defense, {}):
            continue
        scored = cells.survived[defense][column]
        said = [i for i, v in enumerate(final) if v is not None and bool(v) != bool(scored[i])]
        reported[key] = {
            "reported_broken_scored_correct": [i for i in said if scored[i] == 1],
            "reported_robust_scored_wrong": [i for i in said if scored[i] == 0],
        }
    checks = [
        silent_success_check(measured["path"], reported),
        incomplete_optimisation_check(measured["path"]),
        unstable_predictions_check(measured["unstable"]),
        noise_baseline_check(measured["noise"], verdicts(cells, clean), ctx.threat.eps),
    ]
    transfer = [c.label for c in columns if c.attack.name == "transfer"]
    if transfer:
        white_box = {
            d: {c.label: cells.survived[d][c.label] for c in columns if c.attack.uses_estimate}
            for d in defenses
        }
        checks.append(
            transfer_failure_check({d: cells.survived[d][transfer[0]] for d in defenses}, white_box)
        )
    checks.append(dynamic_defense_check(measured["dynamic"]))
    return checks


def verdicts(cells: Cells, clean: Scores) -> dict[str, np.ndarray]:
    """Per defense, bool (S,): clean-correct and broken by no column (a sample a cascade did
    not attack with a column had been broken before it)."""
    return {
        d: clean.correct[d]
        & np.all([v != 0 for v in row.values()], axis=0)
        for d, row in cells.survived.items()
    }
