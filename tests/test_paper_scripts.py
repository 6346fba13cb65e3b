"""The paper scripts (examples/paper) at their tiny preset: each runs end to end on a few dozen
digits with one shared cache of tiny trained models, writes results.json / results.md (and a PNG
for the figures), and its tables have the paper's shape, filled with finite measured numbers
in [0, 100] that come from the run (not the paper's reference numbers)."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

from deq_attacks.training import Gradient
from examples.paper import (
    common,
    figure2,
    figure3,
    figure4,
    table1,
    table2_3,
    table4,
    table5_6,
    table8_9,
    table10,
    table11,
    train_models,
)

#: Columns or rows whose numbers are not percentages.
NOT_PERCENT = {"samples/s", "params (M)", "accumulation (points)", "n", "k", "lam", "beta",
               "mean", "median", "worst", "undefined", "residual z_N"}  # fmt: skip


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("paper_cache")


def setup_for(cache: Path, tmp_path: Path, name: str, *extra: str) -> common.Setup:
    args = common.parse(
        common.parser("test"),
        ["--preset", "tiny", "--cache", str(cache), "--out-dir", str(tmp_path / name), *extra],
    )
    return common.Setup.from_args(args, name)


def numbers(value: Any) -> list[float]:
    """The numbers of a cell: a number, or "a/b/c" (Tables 8/9)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str) and "/" in value:
        try:
            return [float(v) for v in value.split("/")]
        except ValueError:
            return []
    return []


def check_measured(payload: dict[str, Any], out_dir: Path, tables: dict[str, int]) -> None:
    """``tables``: table name -> expected number of rows. Every percentage is finite and in
    [0, 100]; the written JSON holds the same; no measured table equals the paper's."""
    written = json.loads((out_dir / "results.json").read_text())
    assert written["measured"] == json.loads(json.dumps(payload["measured"]))
    assert (out_dir / "results.md").read_text().count("## measured") == len(tables)
    assert set(payload["measured"]) == set(tables)
    assert payload["paper"], "the paper's reference numbers are printed beside"
    assert payload["preset"] == "tiny" and payload["wall_seconds"] >= 0
    # a smoke test says so, beside the paper's numbers: in the record, the intro, every title
    assert payload["comparable_with_paper"] is False
    assert payload["scale"].startswith("NOT COMPARABLE with the paper's table: preset `tiny`")
    text = (out_dir / "results.md").read_text()
    assert f"**{payload['scale']}**" in text and "1 epoch on 60 images" in payload["scale"]
    assert text.count("## measured (tiny preset, not comparable): ") == len(tables)
    for name, rows in payload["measured"].items():
        assert len(rows) == tables[name], name
        assert all(list(r) == list(rows[0]) for r in rows), "one layout per table"
        assert rows not in payload["paper"].values()
        percentages = 0
        for row in rows:
            if "residual" in str(row.get("row", "")) or "residual" in name:
                continue
            for key, value in row.items():
                if key in NOT_PERCENT:
                    continue
                for v in numbers(value):
                    assert math.isfinite(v) and 0 <= v <= 100, (name, key, v)
                    percentages += 1
        assert percentages > 0 or any(w in name for w in ("residual", "strongest", "cosine"))


def test_table1(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "table1")
    payload = table1.run(setup)
    check_measured(payload, setup.out_dir, {"table 1": 2})
    rows = payload["measured"]["table 1"]
    assert list(rows[0]) == ["gradient", "clean", "PGD-2", "PGD-3", "square"]
    assert [r["gradient"] for r in rows] == ["exact", "unrolling"]


def test_table2_3_with_autoattack(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "table2_3", "--threads", "1")
    payload = table2_3.run(setup, autoattack=True)
    tables = {
        "unrolling-trained (8/7), PGD-10": 3,
        "unrolling-trained (8/7), AutoAttack": 3,
        "exact-trained (8/7), PGD-10": 3,
    }
    check_measured(payload, setup.out_dir, tables)
    for rows in payload["measured"].values():
        assert [r["defense"] for r in rows] == ["final", "early", "ensemble"]
        assert list(rows[0]) == [*common.LAYOUT, "bptt (ours)", "worst (ours)"]
        for row in rows:
            attacked = [v for k, v in row.items() if k not in ("defense", "clean")]
            assert row["worst (ours)"] <= min(attacked) and row["worst (ours)"] <= row["clean"]


def test_table4(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "table4")
    payload = table4.run(setup)
    check_measured(payload, setup.out_dir, {"table 4": 2})
    assert payload["measured"]["table 4"][0]["arch"].startswith("baseline (resnet18)")


def test_table5_6(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "table5_6")
    payload = table5_6.run(setup)
    check_measured(payload, setup.out_dir, {"table 5": 2, "table 6": 3})
    assert list(payload["measured"]["table 5"][0])[1:] == [f"z_{n}" for n in range(1, 9)]


def test_table8_9(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "table8_9")
    payload = table8_9.run(setup)
    name = "unrolling-trained: adjoint / adjoint Broyden / unrolled"
    check_measured(payload, setup.out_dir, {name: 3})
    for row in payload["measured"][name]:
        assert all(len(numbers(row[a])) == 3 for a in ("final", "intermediate", "ensemble"))


def test_table10_and_figure2(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "table10")
    payload = table10.run(setup)
    check_measured(payload, setup.out_dir, {"table 10": 4})
    assert all(r["samples/s"] > 0 for r in payload["measured"]["table 10"])
    setup = setup_for(cache, tmp_path, "figure2")
    payload = figure2.run(setup)
    check_measured(
        payload,
        setup.out_dir,
        {"(a) final vs best intermediate state": 2, "(b) relative residual per state": 2},
    )
    residuals = payload["measured"]["(b) relative residual per state"]
    assert all(math.isfinite(v) and v >= 0 for r in residuals for v in list(r.values())[1:])
    assert (setup.out_dir / "figure2.png").stat().st_size > 1000


def test_table11(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "table11")
    payload = table11.run(setup)
    check_measured(payload, setup.out_dir, {"table 11": 4})
    assert list(payload["measured"]["table 11"][0]) == ["row", "0.4", "1.2", "0.4 (unroll)"]


def test_figures3_and_4(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "figure3")
    payload = figure3.run(setup)
    # the tiny sweep: adjoint n in {1, 2} x beta 1; unrolled n in {1, 2} x k 1 x lambda 1
    check_measured(payload, setup.out_dir, {"(a) adjoint u_n": 2, "(b)/(c) unrolled z_n": 2})
    assert (setup.out_dir / "figure3.png").stat().st_size > 1000
    setup = setup_for(cache, tmp_path, "figure4")
    payload = figure4.run(setup)
    tables = {
        "accuracy of z_m under PGD with u_n": 2,
        "strongest adjoint state per z_m": 8,
        "cosine(Adjoint(n+1), Unrolled(n, 1, 1))": 7,
    }
    check_measured(payload, setup.out_dir, tables)
    for row in payload["measured"]["cosine(Adjoint(n+1), Unrolled(n, 1, 1))"]:
        assert row["mean"] is None or -1 <= row["mean"] <= 1


def test_the_scripts_import_only_the_public_api() -> None:
    """Every name a script imports from the package is in its module's ``__all__``, or is a
    submodule that has one: the scripts compose the public API, no internals."""
    private = []
    for path in sorted(Path(common.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                private += [(path.name, a.name) for a in node.names if a.name.startswith("deq_")]
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("deq_"):
                continue
            module = importlib.import_module(str(node.module))
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                public = alias.name in getattr(module, "__all__", ())
                if not public and hasattr(module, "__path__") and importlib.util.find_spec(name):
                    public = hasattr(importlib.import_module(name), "__all__")  # a submodule
                if not public:
                    private.append((path.name, name))
    assert private == []


def test_models_are_shared_through_the_cache(cache: Path, tmp_path: Path) -> None:
    setup = setup_for(cache, tmp_path, "cache")
    first = common.train_cached(setup, "exact")
    again = common.train_cached(setup, "exact")
    assert first.run_dir == again.run_dir and first.run_dir.parent == cache
    assert common.train_config(setup, "exact").fingerprint() in first.run_dir.name
    changed = common.train_config(setup, "exact", jac_weight=1.2)
    assert changed.fingerprint() != common.train_config(setup, "exact").fingerprint()


def test_bad_options_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not 'digits'"):
        setup_for(tmp_path, tmp_path, "x", "--data", str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="no cpu model"):
        common.train_config(setup_for(tmp_path, tmp_path, "x"), "nonsense")


def test_setting_changes_reach_the_configs_and_the_cache_key(tmp_path: Path) -> None:
    setup = setup_for(tmp_path, tmp_path, "x", "--train.optimiser.epochs", "3",
                      "--train.optimiser.jac_weight", "0", "--eval.eps", "0.2")  # fmt: skip
    assert setup.train_settings == {"epochs": 3, "jac_weight": 0.0}  # only what was given
    assert setup.eval_settings == {"eps": 0.2}
    config = common.train_config(setup, "exact")
    assert (config.optimiser.epochs, config.optimiser.jac_weight) == (3, 0.0)
    # the same settings from a config file; an option after it wins
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "train:\n  optimiser:\n    epochs: 3\n  model:\n    training_gradient: phantom\n"
        "eval:\n  eps: 0.3\n"
    )
    from_file = setup_for(tmp_path, tmp_path, "x", "--config", str(settings), "--eval.eps", "0.2")
    assert from_file.train_settings == {"epochs": 3, "training_gradient": Gradient.PHANTOM}
    assert from_file.eval_settings == {"eps": 0.2}
    # the script's own variable (Table 11's weight) wins over the user's setting
    assert common.train_config(setup, "exact", jac_weight=1.2).optimiser.jac_weight == 1.2
    assert common.eval_config(setup).eps == 0.2
    assert common.eval_config(setup, eps=0.3).eps == 0.3
    plain = common.train_config(setup_for(tmp_path, tmp_path, "x"), "exact")
    assert plain.fingerprint() != config.fingerprint()
    with pytest.raises(SystemExit, match="unrecognized arguments: --train.optimiser.epoch 3"):
        setup_for(tmp_path, tmp_path, "x", "--train.optimiser.epoch", "3")
    with pytest.raises(SystemExit, match='key "eval.eps".*Got value: big'):
        setup_for(tmp_path, tmp_path, "x", "--eval.eps", "big")
    with pytest.raises(SystemExit, match=r"--eval.\*: eps must be in \(0, 1\]"):
        setup_for(tmp_path, tmp_path, "x", "--eval.eps", "2")


def test_train_models_in_two_processes_trains_each_distinct_model_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # gamma 0.4 is the exact preset itself: two distinct models, one per process
    argv = ["--preset", "tiny", "--cache", str(tmp_path), "--kinds", "exact",
            "--jac-weights", "0.4,1.2", "--jobs", "2"]  # fmt: skip
    assert train_models.main(argv) == 0
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert len(runs) == 2 and all(r.startswith("exact-") for r in runs)
    assert all((tmp_path / r / "best.safetensors").is_file() for r in runs)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" s")]
    assert len(lines) == 2 and "jac_weight" in lines[1]


def test_protocol_runs_in_two_processes_equal_the_one_process_runs(tmp_path: Path) -> None:
    runs = []
    for jobs in ("2", "1"):
        setup = setup_for(tmp_path / f"cache{jobs}", tmp_path, "x", "--jobs", jobs)
        assert setup.jobs == int(jobs)
        config = common.eval_config(setup)
        runs.append(common.run_protocols(setup, [("unrolling", config), ("exact", config)]))
    for (_, parallel), (_, single) in zip(*runs, strict=True):
        assert parallel.early_exit == single.early_exit and parallel.chosen == single.chosen
        assert parallel.survived == single.survived and parallel.clean == single.clean
    with pytest.raises(SystemExit, match="must be >= 1"):
        setup_for(tmp_path, tmp_path, "x", "--jobs", "0")
