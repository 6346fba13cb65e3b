"""``benchmarks/demo_spread.py``: the demo over seeds, summed up as mean and range (the runs
themselves are monkeypatched here; the script was run end to end with tiny settings)."""

from __future__ import annotations

import json

import pytest

from benchmarks import demo_spread


def fake_run(seed: int, out_dir, extra) -> dict:
    robust = {"final": 0.70 + seed / 100, "early": 0.60, "ensemble": 0.74 - seed / 50}
    best = max(robust, key=robust.get)
    return {"seed": seed, "wall_s": 1.0, "headline": robust[best], "headline_defense": best,
            "early_exit": 2, "chosen": {}, "robust": robust,
            "clean": {d: 0.99 for d in robust}, "n_test": 100}  # fmt: skip


def test_mean_and_range_over_seeds(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo_spread, "run_seed", fake_run)
    out = tmp_path / "spread.json"
    assert demo_spread.main(["--seeds", "0,1,2", "--out", str(out), "--", "--x", "1"]) == 0
    saved = json.loads(out.read_text())
    headline = saved["summary"]["headline"]  # 0.74, 0.72, 0.72
    assert headline["mean"] == pytest.approx(0.7266667) and headline["min"] == pytest.approx(0.72)
    assert headline["max"] == pytest.approx(0.74)
    assert saved["summary"]["robust"]["final"] == pytest.approx(
        {"mean": 0.71, "min": 0.70, "max": 0.72}
    )
    assert saved["extra_arguments"] == ["--x", "1"] and saved["cpu"]
    printed = capsys.readouterr().out
    assert "white-box robustness (headline)    mean  72.7%  range [72.0, 74.0]" in printed
    with pytest.raises(SystemExit):
        demo_spread.main(["--seeds", "0,1"])
