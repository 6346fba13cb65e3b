"""Run the benchmark suite: ``python -m benchmarks.run [--workload small|large|all] ...``.

Writes ``<out-dir>/<device>.json`` (each workload's entry replaces the one an earlier run on
that device left) and renders every device's results into ``--docs`` (docs/benchmarks.md).
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
from benchmarks.cases import CASES, Context  # noqa: E402
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
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
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
        results = []
        for case in CASES:
            print(f"[{name}] {case.__name__} ...", flush=True)
            for row in case(ctx):
                print(f"    {row.id}: {row.measured:.3f} (target {row.target})", flush=True)
                results.append(row.to_json())
        info["load_after"] = round(os.getloadavg()[0], 1)
        runs[name] = {
            "machine": info,
            "settings": vars(settings),
            "description": workload.description,
            "command": command.strip(),
            "wall_s": time.perf_counter() - start,
            "results": results,
        }
    # merge with what earlier runs on this device left (read now: runs may overlap in time)
    data: dict[str, Any] = (
        json.loads(out.read_text()) if out.exists() else {"device": device.type, "workloads": {}}
    )
    data["memory_method"] = memory.method(device)
    data["workloads"].update(runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    report.render(args.out_dir, args.docs)
    print(f"wrote {out} and {args.docs}")
    return data


if __name__ == "__main__":
    main()
