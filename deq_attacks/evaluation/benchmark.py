"""A RobustBench-style entry point: ``benchmark(deq, n_examples, dataset, threat_model, eps,
...)`` runs the white-box protocol in verdict mode (the audited cascade) and returns the
per-sample verdict; ``dry_run=True`` returns the expected cost instead.

It has the shape of ``robustbench.eval.benchmark(model, n_examples, dataset, threat_model,
..., batch_size, eps)``, which runs the standard AutoAttack against a plain network and returns
(clean accuracy, robust accuracy). For a DEQ that attack is not enough (its gradient is an
estimate, and the defense can be the early or the ensemble state), so this runs the whole
protocol (early exit and sweep on a development split held out from the test images, every
gradient estimate with PGD and the standard AutoAttack, BPTT, Square, per defense, per sample)
and reports the best defense's clean and robust accuracy beside each sample's verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deq_attacks.data import ImageDataset, load_arrays_file, load_cifar10, load_digits
from deq_attacks.deq.contract import DEQModel
from deq_attacks.evaluation.cost import describe_cost
from deq_attacks.evaluation.protocol import estimate_cost, evaluate_model
from deq_attacks.evaluation.result import EvaluationReport
from deq_attacks.evaluation.settings import EvaluationConfig, Mode
from deq_attacks.interfaces import DEQEstimator

#: eps when none is given, per named data set (L-inf, inputs in [0, 1]).
DEFAULT_EPS = {"cifar10": 8 / 255, "digits": 0.1}


@dataclass
class BenchmarkResult:
    """What ``benchmark`` found.

    Attributes:
        clean_accuracy, robust_accuracy: of the most robust defense (the white-box robustness
            of the DEQ: the max over defenses of the per-sample robust accuracy).
        defense: that defense's name ("final", "early" or "ensemble").
        verdict: bool (n_examples,): each test sample robust under that defense.
        verdicts: the verdict of every defense.
        report: the whole protocol's report (``write_outputs`` writes it).
    """

    clean_accuracy: float
    robust_accuracy: float
    defense: str
    verdict: np.ndarray
    verdicts: dict[str, np.ndarray]
    report: EvaluationReport


def held_out_images(dataset: str | Path, data_dir: str | Path) -> ImageDataset:
    """The images of a data set that its training split does not contain: CIFAR-10's test set
    (torchvision, under ``data_dir``), the embedded digits past the 1,200 training ones, or an
    arrays file's test split (the whole file if it has none)."""
    if dataset == "cifar10":
        return load_cifar10(data_dir, train=False)
    if dataset == "digits":
        return load_digits().split(1200)[1]
    path = Path(dataset)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r}: not 'cifar10', 'digits' or a file")
    with np.load(path) as arrays:
        has_test = "x_test" in arrays.files
    return load_arrays_file(path, split="test" if has_test else None)


def benchmark(
    model: DEQModel | DEQEstimator,
    n_examples: int = 10_000,
    dataset: str | Path = "cifar10",
    threat_model: str = "Linf",
    *,
    eps: float | None = None,
    batch_size: int | None = None,
    data_dir: str | Path = "./data",
    device: str | torch.device | None = None,
    n_dev: int = 100,
    store_path: Path | None = None,
    progress: Any = print,
    dry_run: bool = False,
    **settings: Any,
) -> BenchmarkResult | dict[str, Any]:
    """The white-box protocol (verdict mode unless ``mode=`` says otherwise) on the first
    ``n_examples`` held-out images; the expected cost is told (``progress``) first.

    Args:
        model: a DEQ (``deq_attacks.DEQ`` or any ``DEQModel``) or its ``DEQEstimator``.
        n_examples: test images: the first ones of the held-out set (RobustBench's choice).
        dataset: "cifar10", "digits" or the path of an arrays file (``.npz``).
        threat_model: "Linf" (the only one the protocol runs).
        eps: the L-inf budget (default 8/255 for cifar10, 0.1 for digits; required for a file);
            the PGD step is eps / 4.
        batch_size: attack batch (None: 100 on CPU, 500 on CUDA).
        data_dir: CIFAR-10's root (torchvision's layout).
        device: where the model runs (default: where its parameters are).
        n_dev: development images for the protocol's choices: the last ones of the held-out
            set, disjoint from the test images.
        store_path: resume from / record into this store file.
        progress: callable(str) told of each step (default print; None: silent).
        dry_run: return the expected cost (``protocol.estimate_cost``: f evaluations per
            step, seconds per f evaluation, expected wall seconds) without attacking.
        **settings: any other ``EvaluationConfig`` field (e.g. ``aa_iterations=5``).
    """
    if threat_model != "Linf":
        raise ValueError(f"threat_model {threat_model!r}: the protocol is L-inf only ('Linf')")
    for name, value in (("n_examples", n_examples), ("n_dev", n_dev)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if eps is None:
        if str(dataset) not in DEFAULT_EPS:
            raise ValueError(f"eps is required for the data set {dataset!r}")
        eps = DEFAULT_EPS[str(dataset)]
    config = EvaluationConfig(
        **{"eps": eps, "step": eps / 4, "batch_size": batch_size, "mode": Mode.VERDICT, **settings}
    )
    data = held_out_images(dataset, data_dir)
    if n_examples + n_dev > len(data):
        raise ValueError(
            f"{len(data)} held-out images of {dataset}: too few for n_examples {n_examples} + "
            f"n_dev {n_dev} (the development images must not be test images)"
        )
    estimator = _estimator(model, data, device)
    test = data.subset(np.arange(n_examples))
    dev = data.subset(np.arange(len(data) - n_dev, len(data)))
    if dry_run:
        cost = estimate_cost(estimator, (test.x, test.y), (dev.x, dev.y), config)
        if progress is not None and cost["countable"]:
            progress("expected cost:\n" + describe_cost(cost["steps"], cost["seconds_per_f"]))
        return cost
    report = evaluate_model(
        estimator, (test.x, test.y), (dev.x, dev.y), config, store_path=store_path,
        description={"benchmark": str(dataset), "n_examples": n_examples}, progress=progress,
    )  # fmt: skip
    verdicts = report.verdict()
    best = max(report.robustness(), key=lambda r: r.robust)
    clean = np.asarray(report.clean[best.defense], dtype=bool)
    return BenchmarkResult(
        clean_accuracy=float(clean.mean()),
        robust_accuracy=best.accuracy,
        defense=best.defense,
        verdict=verdicts[best.defense],
        verdicts=verdicts,
        report=report,
    )


def _estimator(
    model: DEQModel | DEQEstimator, data: ImageDataset, device: str | torch.device | None
) -> DEQEstimator:
    if isinstance(model, DEQEstimator):
        if device is not None and torch.device(device) != model.device:
            raise ValueError(f"the estimator runs on {model.device}, not on {device}")
        return model
    if not isinstance(model, DEQModel):
        raise TypeError(f"model must be a DEQ or a DEQEstimator, got {type(model).__name__}")
    param = next(model.parameters(), None)
    where = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )
    model = model.to(where).eval()
    return DEQEstimator(
        model,
        input_shape=data.x.shape[1:],
        nb_classes=int(data.num_classes or data.y.max() + 1),
        device_type="gpu" if where.type == "cuda" else "cpu",
    )
