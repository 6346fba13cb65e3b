"""Run the benchmark suite: ``python -m benchmarks.run [--workload small|large|all] ...``.

Writes ``<out-dir>/<device>.json`` (the rows of the cases run replace those an earlier run on
that device and workload left; ``--cases`` runs a subset) and renders every device's results
into ``--docs`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import memory, report  # noqa: E402
from benchmarks.cases import CASES, Context, Result, case_bounds, case_run  # noqa: E402
from benchmarks.workloads import Settings, workloads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=("small", "large", "all"), default="small")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per ratio")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or this process's CPU seconds (CPU only: robust to other jobs on a "
        "shared machine when run with --threads 1)",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny model, few steps")
    parser.add_argument(
        "--cases",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(CASES),
        help=f"comma-separated cases to run (default all: {','.join(CASES)})",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    unknown = [name for name in args.cases if name not in CASES]
    if unknown or not args.cases:
        parser.error(f"--cases: unknown {unknown or 'none given'}; choose from {', '.join(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu does not see GPU time: use --clock wall with --device cuda")
    return args


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    import art
    import torchdeq  # noqa: F401  (the benchmark extra; fail early if missing)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_name": f"{name} ({os.cpu_count()} CPUs visible)",
        "torch": torch.__version__,
        "art": art.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_before": round(os.getloadavg()[0], 1),
    }


def merge(entry: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A workload's entry after a run of some cases: their rows, measurements and bounds
    replace the earlier ones; the run is listed with the cases it covered."""
    ran = set(new["runs"][0]["cases"])
    if entry is None or "runs" not in entry:  # none yet, or the layout of an older suite
        return new
    runs = []
    for run in entry["runs"]:
        run["cases"] = [c for c in run["cases"] if c not in ran]
        if run["cases"]:
            runs.append(run)
    merged = {
        "description": new["description"],
        "runs": runs + new["runs"],
        "bounds": {**{k: v for k, v in entry["bounds"].items() if k not in ran}, **new["bounds"]},
    }
    for key in ("results", "measurements"):
        kept = [row for row in entry[key] if row["case"] not in ran]
        rows = kept + new[key]
        merged[key] = sorted(rows, key=lambda row: CASES.index(row["case"]))
    return merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = (
        Settings.quick(args.repeats, args.clock)
        if args.quick
        else Settings(repeats=args.repeats, clock=args.clock)
    )
    available = workloads(args.quick)
    names = ["small", "large"] if args.workload == "all" else [args.workload]
    out = args.out_dir / f"{device.type}.json"
    runs: dict[str, Any] = {}
    command = "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    for name in names:
        workload = available[name]
        info = machine_info(device)
        ctx = Context(workload, settings, device)
        start = time.perf_counter()
        results, measurements = [], []
        for case in args.cases:
            print(f"[{name}] {case} ...", flush=True)
            for row in case_run(case)(ctx):
                record = {**row.to_json(), "case": case}
                if isinstance(row, Result):
                    print(f"    {row.id}: {row.measured:.3f} (target {row.target})", flush=True)
                    results.append(record)
                else:
                    measurements.append(record)
        info["load_after"] = round(os.getloadavg()[0], 1)
        runs[name] = {
            "description": workload.description,
            "runs": [
                {
                    "machine": info,
                    "settings": vars(settings),
                    "command": command.strip(),
                    "wall_s": time.perf_counter() - start,
                    "cases": list(args.cases),
                }
            ],
            "results": results,
            "measurements": measurements,
            "bounds": {case: case_bounds(case) for case in args.cases},
        }
    # merge with what earlier runs on this device left (read now: runs may overlap in time)
    data: dict[str, Any] = (
        json.loads(out.read_text()) if out.exists() else {"device": device.type, "workloads": {}}
    )
    data["memory_method"] = memory.method(device)
    for name, entry in runs.items():
        data["workloads"][name] = merge(data["workloads"].get(name), entry)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    report.render(args.out_dir, args.docs)
    print(f"wrote {out} and {args.docs}")
    return data


if __name__ == "__main__":
    main()
