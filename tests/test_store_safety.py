"""Results are never lost: a store of other weights is moved aside (and the new run works), one
process writes a store at a time, a line that is not a record is dropped with a message, and a
full disk gives one line and leaves what was written before readable."""

from __future__ import annotations

import dataclasses
import errno
import json
import pathlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluation_fixtures import TINY, splits, tiny_estimator

from deq_attacks.checkpoints import save_weights
from deq_attacks.cli import main
from deq_attacks.evaluation import SweepConfig, evaluate_model
from deq_attacks.evaluation.distributed import Shards
from deq_attacks.evaluation.store import ResultStore, StoreBusyError, StoreWriteError

ROOT = Path(__file__).resolve().parents[1]
CHEAPEST = dataclasses.replace(
    TINY,
    attacks="pgd",
    bptt=False,
    sweep=SweepConfig(
        {"adjoint": {"n": "1", "beta": "1.0"}, "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}
    ),
)


def run(path: Path, shift: float = 0.0, said: list[str] | None = None):
    dev, test = splits(8, 8)
    estimator = tiny_estimator(trained=True)
    with torch.no_grad():
        next(estimator.deq.parameters()).add_(shift)
    progress = said.append if said is not None else None
    return evaluate_model(estimator, test, dev, CHEAPEST, store_path=path, progress=progress)


def header(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])["fingerprint"]


def test_a_store_for_old_weights_survives_a_run_with_new_weights(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    old = run(path)
    old_lines = path.read_text()
    said: list[str] = []
    new = run(path, 1e-3, said)
    kept = [p for p in tmp_path.glob("store.*.jsonl")]
    assert len(kept) == 1 and kept[0].read_text() == old_lines  # byte for byte
    assert any(f"they are kept in {kept[0]}" in line for line in said), said
    assert header(path)["weights"] == new.settings["fingerprint"]["weights"]
    assert header(kept[0])["weights"] == old.settings["fingerprint"]["weights"]
    assert header(path)["weights"] != header(kept[0])["weights"]
    # the old weights again on the same path: their store is moved back and resumed (nothing
    # is computed), and the new weights' store is kept in its turn
    new_lines = path.read_text()
    said.clear()
    again = run(path, said=said)
    assert again.survived == old.survived and header(path) == old.settings["fingerprint"]
    assert any(line.startswith("resuming from") for line in said), said
    kept = list(tmp_path.glob("store.*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == new_lines


HOLD = """
import sys, time
from pathlib import Path
from deq_attacks.evaluation.store import lock_store
lock = lock_store(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_second_evaluate_on_one_out_dir_is_refused_while_the_first_holds_it(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    store = out / "store.jsonl"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusyError, match=f"pid {first.pid} on {socket.gethostname()}"):
            run(store)
        weights = save_weights(tiny_estimator(trained=True).deq, tmp_path / "w.safetensors")
        capsys.readouterr()
        assert main(cli_args(weights, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {first.pid}" in err[0] and "another run" in err[0]
    finally:
        first.communicate("\n", timeout=30)
    assert first.returncode == 0
    assert run(store).survived  # the first has finished: the second runs


def cli_args(weights: Path, out_dir: Path) -> list[str]:
    return [
        "evaluate", "--model.name", "mlp_deq", "--model.args.in_features", "64",
        "--model.args.num_classes", "10", "--model.args.hidden", "16",
        "--model.forward_threshold", "4", "--model.checkpoint", str(weights),
        "--n-dev", "8", "--n-test", "8", "--steps", "2",
        "--attacks", "pgd", "--bptt", "false", "--long-steps", "3", "--batch-size", "4",
        "--diagnostic-samples", "2", "--sweep", "adjoint.n=1", "--sweep", "adjoint.beta=1.0",
        "--sweep", "unrolled.n=1", "--sweep", "unrolled.k=1", "--sweep", "unrolled.lam=1.0",
        "--eps", "0.1", "--step", "0.05", "--out-dir", str(out_dir),
    ]  # fmt: skip


def test_a_full_disk_gives_one_line_and_keeps_the_store_readable(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    weights = save_weights(tiny_estimator(trained=True).deq, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    store = out / "store.jsonl"
    real_open = pathlib.Path.open
    appended = []

    class Full:
        def __init__(self, file) -> None:
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

        def write(self, text: str) -> int:
            if len(appended) >= 3:
                self.file.write(text[:7])  # a partial line, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            appended.append(text)
            return self.file.write(text)

    def full_disk_open(self, mode="r", *args, **kwargs):
        file = real_open(self, mode, *args, **kwargs)
        return Full(file) if self == store and mode == "a" else file

    monkeypatch.setattr(pathlib.Path, "open", full_disk_open)
    capsys.readouterr()
    assert main(cli_args(weights, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "what was written before is kept" in err[0]
    monkeypatch.undo()
    # what was written before is readable: the three records, the partial line dropped
    assert len(appended) == 3
    with ResultStore(store, header(store), Shards()) as kept:
        assert kept.resumed and not kept.problems
        written = [json.loads(text) for text in appended]
        for record in written:
            if "block" in record:
                assert kept.blocks(record["key"])[record["block"]] == record["value"]
        last = {r["key"]: r["value"] for r in written if "block" not in r}
        assert all(kept.get(key) == value for key, value in last.items())
    assert main(cli_args(weights, out)) == 0  # and the run resumes to its end
    assert "resuming from" in capsys.readouterr().out


def test_a_full_disk_while_rewriting_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "store.jsonl"
    with ResultStore(path, {"a": 1}, Shards()) as store:
        store.put("step", 1)
        store.put_block("column", 0, [1])
    before = path.read_text()
    real_open = pathlib.Path.open

    def full_disk_open(self, mode="r", *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", full_disk_open)
    with pytest.raises(StoreWriteError, match="No space left on device.*written before is kept"):
        ResultStore(path, {"a": 1}, Shards())  # the rewrite on opening fails
    monkeypatch.undo()
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))
    with ResultStore(path, {"a": 1}, Shards()) as again:  # and the lock was released
        assert again.get("step") == 1 and again.blocks("column") == {0: [1]}


def test_a_line_that_is_json_but_not_a_record_is_dropped_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    with ResultStore(path, {"a": 1}, Shards()) as store:
        store.put("first", [1, 2])
        store.put_block("column", 0, {"index": [0]})
    lines = path.read_text().splitlines()
    bad = ["[1, 2]", '{"key": "x"}', '{"key": "column", "block": "one", "value": 1}', "{no"]
    path.write_text("\n".join(lines[:2] + bad + lines[2:]) + "\n")
    with ResultStore(path, {"a": 1}, Shards()) as again:
        assert again.resumed and again.get("first") == [1, 2]
        assert again.blocks("column") == {0: {"index": [0]}}
        assert [p.split(" (")[0] for p in again.problems] == [
            "line 3 is not a record", "line 4 is not a record", "line 5 is not a record",
            "line 6 is not JSON",
        ]  # fmt: skip
    assert len(path.read_text().splitlines()) == 3  # rewritten without them
    # through the protocol: the message, then the dropped step is recomputed
    store = tmp_path / "eval.jsonl"
    first = run(store)
    lines = store.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line).get("key") == "clean")
    lines[index] = json.dumps([json.loads(lines[index])])  # JSON, but not a record
    store.write_text("\n".join(lines) + "\n")
    said: list[str] = []
    again_report = run(store, said=said)
    assert any(f"line {index + 1} is not a record" in s and "recomputed" in s for s in said)
    assert again_report.clean == first.clean
    assert np.array_equal(np.array(again_report.clean["final"]), np.array(first.clean["final"]))
