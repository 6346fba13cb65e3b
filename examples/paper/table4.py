"""Table 4: the DEQ's white-box robustness (ensemble defense, worst over every attack of the
protocol) beside a deep network trained by the same PGD-AT recipe (ResNet-18; WRN-34-10 beside
DEQ-XL under --preset paper), both under PGD-10 and AutoAttack.

    python -m examples.paper.table4 --preset cpu
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier

from deq_attacks.evaluation import run_standard_autoattack
from examples.paper import common

PAPER = [
    {"arch": "ResNet-18", "clean": 82.52, "PGD-10": 53.58, "AA": 48.51, "params (M)": 10.0},
    {"arch": "DEQ-Large", "clean": 79.67, "PGD-10": 47.12, "AA": 48.37, "params (M)": 10.0},
    {"arch": "WRN-34-10", "clean": 86.07, "PGD-10": 56.60, "AA": 52.19, "params (M)": 48.0},
    {"arch": "DEQ-XL", "clean": 81.17, "PGD-10": 51.70, "AA": 54.09, "params (M)": 48.0},
]
PAIRS = {"paper": [("unrolling", "baseline"), ("unrolling_xl", "baseline_xl")],
         "cpu": [("unrolling", "baseline")], "tiny": [("unrolling", "baseline")]}  # fmt: skip


def params(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 3)


def baseline_row(setup: common.Setup, kind: str, config: Any) -> dict[str, Any]:
    """Clean, PGD-10 (ART, one random start) and the standard AutoAttack of a plain network."""
    result = common.train_cached(setup, kind)
    model, (_, test) = result.model, common.split(setup)
    device = torch.device(setup.device)
    classifier = PyTorchClassifier(
        model, loss=torch.nn.CrossEntropyLoss(), input_shape=test.x.shape[1:],
        nb_classes=result.num_classes, clip_values=(0.0, 1.0),
        device_type="gpu" if setup.device == "cuda" else "cpu",
    )  # fmt: skip
    pgd = ProjectedGradientDescent(
        classifier, norm=np.inf, eps=config.eps, eps_step=config.step, max_iter=config.steps,
        num_random_init=1, batch_size=config.batch_size, verbose=False,
    )  # fmt: skip
    np.random.seed(config.seed)
    clean = classifier.predict(test.x).argmax(1) == test.y
    x_pgd = pgd.generate(test.x, np.eye(classifier.nb_classes, dtype=np.float32)[test.y])
    robust_pgd = clean & (classifier.predict(x_pgd).argmax(1) == test.y)
    survived = []
    for start in range(0, len(test), config.batch_size):
        xb = torch.as_tensor(test.x[start : start + config.batch_size], device=device)
        yb = torch.as_tensor(test.y[start : start + config.batch_size], device=device)
        outcome = run_standard_autoattack(
            model, xb, yb, config.eps, common.autoattack_settings(config), classifier.nb_classes,
            seeds=config.seed,
        )  # fmt: skip
        with torch.no_grad():
            survived.append((model(torch.as_tensor(outcome.x_adv, device=device)).argmax(1)
                             == yb).cpu().numpy())  # fmt: skip
    robust_aa = clean & np.concatenate(survived)
    return {"arch": f"{kind} ({train_model(setup, kind)})",
            "clean": common.pct(clean.mean()), "PGD-10": common.pct(robust_pgd.mean()),
            "AA": common.pct(robust_aa.mean()), "params (M)": params(model)}  # fmt: skip


def train_model(setup: common.Setup, kind: str) -> str:
    return common.train_config(setup, kind).model.name


def deq_row(setup: common.Setup, kind: str, config: Any) -> dict[str, Any]:
    """The ensemble defense's worst column over the protocol's PGD and AutoAttack columns."""
    result, report = common.run_protocol(setup, kind, config)
    acc = common.column_accuracy(report)["ensemble"]
    pgd = min(v for k, v in acc.items() if k.endswith("PGD"))
    aa = min(v for k, v in acc.items() if k.endswith("AA"))
    return {"arch": f"{kind} ({train_model(setup, kind)}), ensemble defense",
            "clean": acc["clean"], "PGD-10": pgd, "AA": aa,
            "params (M)": params(result.model)}  # fmt: skip


def run(setup: common.Setup) -> dict:
    started = time.perf_counter()
    config = common.eval_config(setup, autoattack=True)
    rows = []
    for deq_kind, baseline_kind in PAIRS[setup.preset]:
        rows.append(baseline_row(setup, baseline_kind, config))
        rows.append(deq_row(setup, deq_kind, config))
    return common.write_results(
        setup, "Table 4: DEQ against a deep network, same PGD-AT recipe", {"table 4": rows},
        {"table 4": PAPER}, started,
        notes=[f"{common.SPLITS[setup.preset][1]} test images at most, eps {config.eps}; "
               f"AutoAttack {common.autoattack_settings(config).describe()}",
               "DEQ: the worst PGD-10 and the worst AutoAttack column of the ensemble defense "
               "(the protocol of tables 2/3); baseline: ART PGD-10 and the same AutoAttack"],
    )  # fmt: skip


main = common.main_wrapper(run, __doc__.splitlines()[0], "table4")

if __name__ == "__main__":
    raise SystemExit(main())
