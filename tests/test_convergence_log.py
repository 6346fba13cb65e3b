"""Convergence warnings: once per run with a count. Inside a ``ConvergenceLog`` forwards are
counted per call site (the caller of ``predict`` or of ``module(x)``) and summed up in one
warning at its end; outside, the process warns once and sums up the rest at exit."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from test_estimator_api import batch, estimator, tanh_deq

from deq_attacks import Broyden, DEQEstimator
from deq_attacks.deq import RESIDUAL_LIMIT, ConvergenceLog, NotConvergedWarning


def unconverged() -> DEQEstimator:
    return estimator(tanh_deq(solver=Broyden(threshold=1)))


def caught_warnings() -> warnings.catch_warnings[list[warnings.WarningMessage]]:
    return warnings.catch_warnings(record=True)


def not_converged(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, NotConvergedWarning)]


def test_outside_a_log_the_process_warns_once_and_counts_the_rest() -> None:
    from deq_attacks.deq import convergence

    est = unconverged()
    x, _ = batch()
    with caught_warnings() as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            est.predict(x)  # one call site, three unconverged forwards
        est.predict(x)  # another call site
        for _ in range(2):
            est.model(torch.from_numpy(x))  # the autograd path, a third site
    found = not_converged(caught)
    assert len(found) == 1  # not once per call site: ART calls the model from many places
    assert found[0].filename == __file__  # attributed to the caller
    assert "this process warns once" in str(found[0].message)
    assert str(found[0].message).startswith("3 of 3 samples (100.0%)")
    assert convergence._PROCESS.later_forwards == 5
    assert convergence._PROCESS.later_samples == 15
    with caught_warnings() as caught:
        warnings.simplefilter("always")
        convergence._PROCESS.summary()  # what runs at exit
    (summary,) = not_converged(caught)
    assert str(summary.message).startswith("5 more forward(s) (15 samples)")


def test_a_log_counts_every_forward_per_site_and_summarises_once() -> None:
    est = unconverged()
    x, _ = batch()
    with caught_warnings() as caught:
        warnings.simplefilter("always")
        with ConvergenceLog() as log:
            for _ in range(4):
                est.predict(x, batch_size=2)  # one site: 4 forwards of 3 samples
            inside = len(not_converged(caught))
    assert inside == 0  # forwards are counted; the run warns once, at its end
    found = not_converged(caught)
    assert len(found) == 1
    summary = str(found[0].message)
    assert summary.startswith("4 forward solves left 12 samples above")
    assert "at 1 call site(s)" in summary and "4 of 4 forwards, 12 of 12 samples" in summary
    assert found[0].filename == __file__
    (record,) = json.loads(json.dumps(log.records))
    residual = float(est.deq.relative_residuals()[:, -1].max())
    assert record["site"].startswith(f"{__file__}:")
    assert record["calls"] == record["unconverged_calls"] == 4
    assert record["samples"] == record["samples_above"] == 12
    assert record["samples_nonfinite"] == 0
    assert record["worst_residual"] >= residual > RESIDUAL_LIMIT


def test_a_new_log_warns_again_and_converged_forwards_are_counted_silently() -> None:
    est = unconverged()
    good = estimator(tanh_deq(solver=Broyden(threshold=30, tol=1e-10)))
    x, _ = batch()
    for _ in range(2):  # each run is its own scope, and warns once
        with caught_warnings() as caught:
            warnings.simplefilter("always")
            with ConvergenceLog():
                est.predict(x)
        assert len(not_converged(caught)) == 1
    with caught_warnings() as caught:
        warnings.simplefilter("always")
        with ConvergenceLog() as log:
            for _ in range(2):
                good.predict(x)
    assert not_converged(caught) == []
    (record,) = log.records
    assert record["calls"] == 2 and record["unconverged_calls"] == 0
    assert record["samples"] == 6 and record["samples_above"] == 0
    assert record["worst_residual"] <= 1e-8


def test_nested_logs_both_count_and_each_warns_once() -> None:
    est = unconverged()
    x, _ = batch()
    with caught_warnings() as caught:
        warnings.simplefilter("always")
        with ConvergenceLog() as outer:
            est.predict(x)
            with ConvergenceLog() as inner:
                for _ in range(2):
                    est.predict(x)
    assert len(outer.records) == 2 and len(inner.records) == 1
    assert sum(r["calls"] for r in outer.records) == 3 and inner.records[0]["calls"] == 2
    assert len(not_converged(caught)) == 2  # one summary each


def test_nan_residuals_count_as_above_the_limit() -> None:
    from deq_attacks.deq.convergence import warn_unconverged

    with caught_warnings() as caught:
        warnings.simplefilter("always")
        with ConvergenceLog() as log:
            warn_unconverged(torch.tensor([0.01, float("nan"), 0.2]), stacklevel=1)
    (record,) = log.records
    assert record["samples_above"] == 2 and record["samples_nonfinite"] == 1
    assert record["worst_residual"] == pytest.approx(0.2)
    assert "1 NaN/inf" in str(not_converged(caught)[0].message)
    assert np.isfinite(record["worst_residual"])


def test_a_log_is_entered_once() -> None:
    log = ConvergenceLog()
    with log, pytest.raises(RuntimeError, match="entered once"), log:
        pass
