"""What a newcomer's ``deq-attacks`` demo gives: the default run over several seeds, one after
the other, each in a fresh process, and the mean, min and max of its headline (the white-box
robustness per sample: the most robust defense's accuracy under every column) and of each
defense's robust accuracy, with the CPU and torch that ran them.

    python -m benchmarks.demo_spread --seeds 0,1,2          # about 3 x 2.5 min on 2 cores
    python -m benchmarks.demo_spread --seeds 0,1,2 --out benchmarks/results/demo_spread.json

Each seed's outputs stay in ``<runs>/seed_<s>/`` (a rerun resumes from their stores); extra
arguments after ``--`` go to every ``deq-attacks demo`` call (e.g.
``-- --train.optimiser.epochs 2``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what ``platform`` says)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_seed(seed: int, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One demo run with ``--seed seed`` into ``out_dir``; its headline numbers."""
    command = [sys.executable, "-m", "deq_attacks", "demo", "--seed", str(seed),
               "--out_dir", str(out_dir), *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    saved = json.loads((out_dir / "results.json").read_text())
    best = saved["white_box_robustness"]["per_sample"]
    clean = {d: sum(flags) / len(flags) for d, flags in saved["clean"].items()}
    return {
        "seed": seed,
        "wall_s": round(seconds, 1),
        "headline": best["accuracy"],
        "headline_defense": best["defense"],
        "early_exit": saved["early_exit"],
        "chosen": saved["chosen"],
        "robust": {r["defense"]: r["accuracy"] for r in saved["per_defense"]["per_sample"]},
        "clean": clean,
        "n_test": saved["settings"]["n_test"],
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over the runs of the headline and of each defense's numbers."""
    defenses = list(runs[0]["robust"])
    return {
        "headline": spread([r["headline"] for r in runs]),
        "robust": {d: spread([r["robust"][d] for r in runs]) for d in defenses},
        "clean": {d: spread([r["clean"][d] for r in runs]) for d in defenses},
    }


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    extra = args_in[args_in.index("--") + 1 :] if "--" in args_in else []
    own = args_in[: args_in.index("--")] if "--" in args_in else args_in
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3)")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo_spread"))
    parser.add_argument("--out", type=Path, default=Path("runs/demo_spread/spread.json"))
    args = parser.parse_args(own)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 3:
        parser.error(f"give at least three seeds, got {seeds}")
    runs = [run_seed(s, args.runs / f"seed_{s}", extra) for s in seeds]
    import torch

    result = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "extra_arguments": extra,
        "runs": runs,
        "summary": summarise(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    summary = result["summary"]
    print(f"{len(runs)} seeds on {result['cpu']} (torch {result['torch']}), "
          f"n={runs[0]['n_test']} test digits each:")  # fmt: skip
    rows = [("white-box robustness (headline)", summary["headline"])]
    rows += [(f"robust per sample, {d}", s) for d, s in summary["robust"].items()]
    for name, s in rows:
        print(f"  {name:<34} mean {100 * s['mean']:5.1f}%  "
              f"range [{100 * s['min']:.1f}, {100 * s['max']:.1f}]")  # fmt: skip
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
