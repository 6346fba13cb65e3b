"""The one process-group helper (deq_attacks.distributed): alone every collective is the
identity; under a torchrun-style environment two gloo processes join one group, sum, gather
and wait together, and the evaluation's shards read the same rank and world."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deq_attacks import distributed
from deq_attacks.evaluation.distributed import Shards

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_alone_every_collective_is_the_identity(no_torchrun: None) -> None:
    with distributed.process_group("cpu") as processes:
        assert processes == distributed.Processes(0, 1, torch.device("cpu"), owns_group=False)
        assert processes.is_main and not processes.distributed
        values = torch.tensor([1.0, 2.0])
        total = distributed.sum_over_processes(values)
        assert torch.equal(total, values) and total is not values
        assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
        assert distributed.rank_and_world() == (0, 1) and distributed.is_main_process()
        distributed.barrier()
    assert not dist.is_initialized()


def test_bad_device_or_environment_is_refused(
    no_torchrun: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'gpu'"):
        distributed.start("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            distributed.start("cuda")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.start("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 is not in 0..WORLD_SIZE-1"):
        distributed.start("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    with distributed.process_group("cpu") as processes:
        total = distributed.sum_over_processes(torch.tensor([rank + 1.0, 10.0 * rank]))
        gathered = distributed.gather_objects({"rank": rank})
        distributed.barrier()
        shards = Shards.current(4)
        record = {
            "rank": processes.rank,
            "world": processes.world,
            "owns": processes.owns_group,
            "total": total.tolist(),
            "gathered": gathered,
            "shards": [shards.rank, shards.world],
            "main": distributed.is_main_process(),
        }
    record["closed"] = not dist.is_initialized()
    Path(f"{out}.{rank}").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_gloo_processes_share_one_group(tmp_path: Path) -> None:
    out = tmp_path / "rank"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    for rank in (0, 1):
        record = json.loads(Path(f"{out}.{rank}").read_text())
        assert (record["rank"], record["world"], record["owns"]) == (rank, 2, True)
        assert record["total"] == [3.0, 10.0]
        assert record["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert record["shards"] == [rank, 2] and record["closed"]
        assert record["main"] is (rank == 0)
