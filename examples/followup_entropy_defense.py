"""The follow-up's input-entropy-reduction defense (Yang, Li, Pang, Liu, ICML 2023) on the 8x8
digits: attacked as its authors did (PGD crafted with the defense off, scored with it on) and
adaptively (exact gradient through the defense, BPDA), with 95% Wilson intervals.

    python -m examples.followup_entropy_defense --n 100 --out_dir runs/followup_entropy

The DEQ is the demo's (``deq-attacks train --preset demo``: PGD-AT at eps 0.1, the unrolling
gradient), trained once into ``--cache``. The threat model is the digits preset's (L-inf eps
0.1, PGD-10 with step 0.025); the defense keeps the paper's shape (rounds of 2 solver steps,
10 signed steps) with its budget scaled from CIFAR's 8/255 to the digits' 0.1: steps of 0.025
(= 2/255 x 0.1 / (8/255)) within 0.1. Test images: the first ``--n`` digits after the 1,200
that training draws from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deq_attacks import DEQEstimator
from deq_attacks.data import load_digits
from deq_attacks.deq.entropy import InputEntropyReduction
from deq_attacks.evaluation import ThreatModel
from deq_attacks.evaluation.entropy_defense import evaluate_entropy_defense
from deq_attacks.evaluation.threat import AutoAttackSettings
from deq_attacks.training import preset, train_cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="test digits")
    parser.add_argument("--out_dir", type=Path, default=Path("runs/followup_entropy"))
    parser.add_argument("--cache", type=Path, default=Path("runs/paper_cache"))
    parser.add_argument("--autoattack", action="store_true",
                        help="also the AutoAttack (reduced: 5 iterations, 2 targets, 50 queries)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = train_cached(preset("demo"), args.cache, "demo")
    deq = run.load_best()
    test = load_digits().split(1200)[1].subset(range(args.n))
    estimator = DEQEstimator(deq, input_shape=test.x.shape[1:], nb_classes=10)
    threat = ThreatModel(eps=0.1, step=0.025, steps=10)
    defense = InputEntropyReduction(steps=10, step=0.025, eps=0.1, every=2)
    result = evaluate_entropy_defense(
        estimator, test.x, test.y, threat, defense,
        autoattack=AutoAttackSettings(5, 50, 2) if args.autoattack else None,
        batch_size=50, progress=print,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {**result.to_json(), "seconds": seconds, "model": str(run.run_dir)}
    (args.out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    table = result.markdown()
    (args.out_dir / "results.md").write_text(table + "\n")
    print(table)
    print(f"{seconds:.0f} s")


if __name__ == "__main__":
    main()
