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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deq_attacks.data import ImageDataset, load_cifar10, load_mnist
from deq_attacks.deq.contract import DEQModel
from deq_attacks.evaluation.aggregate import Robustness
from deq_attacks.evaluation.cost import describe_cost
from deq_attacks.evaluation.protocol import estimate_cost, evaluate_model
from deq_attacks.evaluation.result import EvaluationReport
from deq_attacks.evaluation.settings import EvaluationConfig, Mode
from deq_attacks.evaluation.threat import NORMS
from deq_attacks.interfaces import DEQEstimator, art_device_type
from deq_attacks.model_spec import ModelSpec, build_model
from deq_attacks.splits import held_out_data

#: eps when none is given, per named data set and threat model (inputs in [0, 1]): CIFAR-10's
#: are RobustBench's; MNIST's are the common L-inf 0.3 and L2 2.0 (Madry et al., Croce & Hein);
#: the 8x8 digits' L2 0.5 is the demo's L-inf 0.1 spread over about 25 of the 64 pixels.
DEFAULT_EPS = {
    ("cifar10", "Linf"): 8 / 255,
    ("cifar10", "L2"): 0.5,
    ("mnist", "Linf"): 0.3,
    ("mnist", "L2"): 2.0,
    ("digits", "Linf"): 0.1,
    ("digits", "L2"): 0.5,
}
#: The data sets ``benchmark`` knows by name.
NAMED_DATASETS = ("cifar10", "mnist", "digits")


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
        robustness: the robust accuracy with its 95% Wilson interval and counts.
        dataset, eps: what was attacked, at which radius (in ``threat_model``).
        standard: whether every budget was the standard one (AutoAttack's included).
        threat_model: the norm, "Linf" or "L2" (RobustBench's names).
    """

    clean_accuracy: float
    robust_accuracy: float
    defense: str
    verdict: np.ndarray
    verdicts: dict[str, np.ndarray]
    report: EvaluationReport
    robustness: Robustness
    dataset: str
    eps: float
    standard: bool
    threat_model: str = "Linf"

    def __repr__(self) -> str:
        budget = "standard" if self.standard else "reduced budgets"
        return (
            f"BenchmarkResult({self.dataset}, {self.threat_model} eps={self.eps:.4g}, "
            f"n={self.robustness.n}: "
            f"clean {100 * self.clean_accuracy:.1f}%, robust {self.robustness} (95% Wilson) "
            f"under {self.defense}, n*={self.report.early_exit}, {budget})"
        )

    def model_info(self, **fields: Any) -> dict[str, Any]:
        """RobustBench's ``model_info`` card (``model_info/<dataset>/<threat_model>/<name>.json``):
        ``clean_acc`` and ``autoattack_acc`` (here the per-sample robust accuracy of the whole
        white-box protocol, which includes the standard AutoAttack), in percent with two
        decimals, ``dataset`` and ``eps``; the fields RobustBench fills by hand (``link``,
        ``name``, ``authors``, ``additional_data``, ``number_forward_passes``, ``venue``,
        ``architecture``, ``reported``) are None unless given in ``fields``. A ``footnote``
        says how the number was obtained."""
        unknown = set(fields) - set(MODEL_INFO_FIELDS)
        if unknown:
            raise ValueError(f"unknown model_info fields {sorted(unknown)}: {MODEL_INFO_FIELDS}")
        r = self.robustness
        footnote = (
            f"deq-attacks white-box protocol ({'standard' if self.standard else 'REDUCED'} "
            f"budgets), {self.defense} defense, n={r.n}, 95% Wilson interval "
            f"[{100 * r.low:.2f}, {100 * r.high:.2f}]"
        )
        card: dict[str, Any] = dict.fromkeys(MODEL_INFO_FIELDS)
        card.update(
            dataset=self.dataset,
            eps=f"{self.eps:.6g}",
            clean_acc=f"{100 * self.clean_accuracy:.2f}",
            autoattack_acc=f"{100 * self.robust_accuracy:.2f}",
            footnote=footnote,
        )
        card.update(fields)
        return card

    def save_model_info(self, path: str | Path, **fields: Any) -> Path:
        """Write ``model_info(**fields)`` as JSON to ``path``; return it."""
        path = Path(path)
        path.write_text(json.dumps(self.model_info(**fields), indent=2) + "\n")
        return path


#: The keys of RobustBench's model_info cards, in its order.
MODEL_INFO_FIELDS = (
    "link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
    "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote",
)  # fmt: skip


def standard_budgets(config: EvaluationConfig) -> bool:
    """Whether the run attacked with the standard AutoAttack and every attack's budget was
    the standard one (``Attack.budget_marks``: Square with 5,000 queries, ...)."""
    attacks = config.attack_specs
    marks = [standard for attack in attacks for _, _, standard in attack.budget_marks()]
    return any(attack.name == "autoattack" for attack in attacks) and all(marks)


def held_out_images(dataset: str | Path, data_dir: str | Path) -> ImageDataset:
    """The images of a data set that its training split does not contain: CIFAR-10's or
    MNIST's test set (torchvision's layout, under ``data_dir``), or the held-out part of the
    embedded digits or an arrays file (``deq_attacks.splits.held_out_data``)."""
    if dataset == "cifar10":
        return load_cifar10(data_dir, train=False)
    if dataset == "mnist":
        return load_mnist(data_dir, train=False)
    return held_out_data(str(dataset))


def benchmark(
    model: DEQModel | DEQEstimator | ModelSpec,
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
        model: a DEQ (``deq_attacks.DEQ`` or any ``DEQModel``), its ``DEQEstimator``, or a
            ``ModelSpec`` (the model options of ``deq-attacks evaluate``: name, args, solvers,
            checkpoint), built for the data set's images by ``model_spec.build_model``.
        n_examples: test images: the first ones of the held-out set (RobustBench's choice).
        dataset: "cifar10", "mnist", "digits" or the path of an arrays file (``.npz``).
        threat_model: "Linf" or "L2" (RobustBench's names): the norm of every attack.
        eps: the budget in that norm (default: L-inf 8/255 for cifar10, 0.3 for mnist, 0.1 for
            digits; L2 0.5 for cifar10 and digits, 2.0 for mnist; required for a file); the PGD
            step is eps / 4 (under L2 with 10 steps Madry et al.'s 2.5 eps / steps); under L2
            the large-eps check runs at 16 eps.
        batch_size: attack batch (None: 100 on CPU, 500 on CUDA).
        data_dir: CIFAR-10's or MNIST's root (torchvision's layout: ``cifar-10-batches-py``,
            ``MNIST/raw``).
        device: where the model runs (default: where its parameters are).
        n_dev: development images for the protocol's choices: the last ones of the held-out
            set, disjoint from the test images.
        store_path: resume from / record into this store file.
        progress: callable(str) told of each step (default print; None: silent).
        dry_run: return the expected cost (``protocol.estimate_cost``: f evaluations per
            step, seconds per f evaluation, expected wall seconds) without attacking.
        **settings: any other ``EvaluationConfig`` field (e.g.
            ``attacks="pgd,autoattack:iterations=5"``).
    """
    if threat_model not in NORMS:
        raise ValueError(f"threat_model must be one of {', '.join(NORMS)}, got {threat_model!r}")
    for name, value in (("n_examples", n_examples), ("n_dev", n_dev)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise TypeError(f"eps must be a number, got {eps!r} ({type(eps).__name__})")
    if device is not None:
        try:
            wanted = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device {device!r} is not a torch device ({error})") from None
        if wanted.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available")
    if eps is None:
        if (str(dataset), threat_model) not in DEFAULT_EPS:
            raise ValueError(f"eps is required for the data set {dataset!r}")
        eps = DEFAULT_EPS[(str(dataset), threat_model)]
    if "norm" in settings:
        raise ValueError("the norm of benchmark() is its threat_model argument, not a setting")
    if threat_model == "L2":  # the large-eps check at 16 eps, as the cifar10_l2 preset
        settings = {"large_eps": 16 * eps, **settings}
    config = EvaluationConfig(
        **{
            "eps": eps, "step": eps / 4, "batch_size": batch_size, "mode": Mode.VERDICT,
            "norm": threat_model, **settings,
        }  # fmt: skip
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
        robustness=best,
        dataset=Path(dataset).stem if str(dataset) not in NAMED_DATASETS else str(dataset),
        eps=float(eps),
        standard=standard_budgets(config),
        threat_model=threat_model,
    )


def _estimator(
    model: DEQModel | DEQEstimator | ModelSpec,
    data: ImageDataset,
    device: str | torch.device | None,
) -> DEQEstimator:
    classes = int(data.num_classes or data.y.max() + 1)
    if isinstance(model, ModelSpec):
        built = build_model(model, data.image_shape, classes).model
        if not isinstance(built, DEQModel):
            raise TypeError(f"benchmark() takes DEQs; model {model.name} trains with autograd")
        model = built
    if isinstance(model, DEQEstimator):
        if device is not None and torch.device(device) != model.device:
            raise ValueError(f"the estimator runs on {model.device}, not on {device}")
        return model
    if not isinstance(model, DEQModel):
        raise TypeError(
            f"model must be a DEQ, a DEQEstimator or a ModelSpec of a DEQ, got "
            f"{type(model).__name__}"
        )
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
        nb_classes=classes,
        device_type=art_device_type(where),
    )
