"""Sharding by sample blocks across processes: 2 gloo processes on CPU (as under
``torchrun --nproc_per_node=2``) give the same per-sample results as one process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from evaluation_fixtures import TINY, splits, tiny_estimator

from deq_attacks.evaluation import SweepConfig, evaluate_model
from deq_attacks.evaluation.distributed import Shards, map_blocks

CONFIG = dataclasses.replace(
    TINY,
    long_steps=3,
    sweep=SweepConfig(
        {"adjoint": {"n": "1", "beta": "1.0"}, "unrolled": {"n": "2", "k": "1", "lam": "1.0"}}
    ),
)


def run_once() -> dict:
    dev, test = splits(8, 16)  # 2 blocks of 8 test samples
    report = evaluate_model(tiny_estimator(trained=True), test, dev, CONFIG)
    return json.loads(json.dumps(report.to_json()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shards = Shards.current(3)
        assert (shards.rank, shards.world) == (rank, world)

        def block(part: np.ndarray) -> dict[str, np.ndarray]:
            return {"i": part, "r": np.full(len(part), rank)}

        gathered = map_blocks(block, 10, shards)
        report = run_once()
        Path(f"{out}.{rank}").write_text(
            json.dumps({"report": report, "i": gathered["i"].tolist(), "r": gathered["r"].tolist()})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    out = tmp_path / "two"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    one = run_once()
    for rank in (0, 1):
        two = json.loads(Path(f"{out}.{rank}").read_text())
        # blocks of 3 of 10 samples: rank 0 computes blocks 0 and 2, rank 1 blocks 1 and 3
        assert two["i"] == list(range(10))
        assert two["r"] == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1]
        report = two["report"]
        assert report["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
        for key in ("survived", "clean", "extras", "sweep", "early_exit", "states", "chosen",
                    "diagnostics"):  # fmt: skip
            assert report[key] == one[key], key
