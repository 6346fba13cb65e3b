"""The GPU paths of the evaluation, checked on the CPU: the fixed-step PGD through
``torch.compile`` (a cheap backend here) equals the plain one; bf16 autocast attacks run in
bf16 and are reported beside the same column in fp32 on the same images; and the
RobustBench-style ``benchmark`` entry point."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from evaluation_fixtures import SQUARE, TINY, splits, tiny_estimator

from deq_attacks import Phantom, Unrolled
from deq_attacks.adversarial import DefendedModel, compiled
from deq_attacks.evaluation import (
    EvaluationConfig,
    SweepConfig,
    ThreatModel,
    benchmark,
    evaluate_model,
    fixed_step_pgd,
)
from deq_attacks.evaluation.attacks import precision
from deq_attacks.evaluation.benchmark import MODEL_INFO_FIELDS, held_out_images
from deq_attacks.models import small_conv_deq

THREAT = ThreatModel(eps=0.1, step=0.05, steps=2)
SWEEP = SweepConfig(
    {"adjoint": {"n": "1", "beta": "1.0"}, "unrolled": {"n": "1", "k": "1", "lam": "1.0"}}
)


def test_compiled_pgd_equals_the_plain_one() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits(8, 1)
    plain = fixed_step_pgd(estimator, Phantom(2, 0.5), x, y, THREAT, seed=1)
    fast = fixed_step_pgd(estimator, Phantom(2, 0.5), x, y, THREAT, seed=1,
                          compile_backend="aot_eager")  # fmt: skip
    np.testing.assert_allclose(fast, plain, atol=1e-6)
    model = DefendedModel.of(estimator)
    view = compiled(model, "aot_eager")
    assert view.deq is not model.deq and view.deq is compiled(model, "aot_eager").deq
    assert isinstance(view.deq.f, torch._dynamo.eval_frame.OptimizedModule)
    shared = {id(p) for p in estimator.deq.parameters()}
    assert {id(p) for p in view.deq.parameters()} == shared  # no parameter copied
    assert view.estimate == model.estimate and view.defense == model.defense


def test_bf16_attacks_run_in_bf16() -> None:
    estimator = tiny_estimator(trained=True)
    (x, y), _ = splits(16, 1)
    dtypes = []
    hook = estimator.deq.head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with precision(estimator.device, "bf16"):
        low = fixed_step_pgd(estimator, Unrolled(1, 1, 1.0), x, y, THREAT)
    hook.remove()
    assert torch.bfloat16 in dtypes
    full = fixed_step_pgd(estimator, Unrolled(1, 1, 1.0), x, y, THREAT)
    assert not np.array_equal(low, full)  # other arithmetic, other path
    assert np.abs(low - x).max() <= THREAT.eps + 1e-6 and low.dtype == np.float32
    correct = [(estimator.predict(a).argmax(1) == y).mean() for a in (low, full)]
    assert abs(correct[0] - correct[1]) <= 0.25
    with pytest.raises(ValueError, match="precision"), precision(estimator.device, "fp8"):
        pass


def test_bf16_protocol_reports_fp32_beside_it_on_the_same_images() -> None:
    dev, test = splits()
    cheap = dataclasses.replace(TINY, attacks=f"pgd,{SQUARE}", bptt=False, sweep=SWEEP)
    low = evaluate_model(
        tiny_estimator(trained=True), test, dev, dataclasses.replace(cheap, precision="bf16")
    )
    check = next(c for c in low.diagnostics if c.name == "bf16_vs_fp32")
    assert check.numbers["column"] == "ready-made PGD"
    full = evaluate_model(tiny_estimator(trained=True), test, dev, cheap)
    fp32 = {d: float(np.mean(full.survived[d]["ready-made PGD"])) for d in full.defenses}
    assert check.numbers["fp32"] == pytest.approx(fp32)  # the fp32 run of the same column
    bf16 = {d: float(np.mean(low.survived[d]["ready-made PGD"])) for d in low.defenses}
    assert check.numbers["bf16"] == pytest.approx(bf16)
    assert all(c.name != "bf16_vs_fp32" for c in full.diagnostics)


def test_benchmark_runs_the_verdict_mode_and_returns_the_per_sample_verdict() -> None:
    deq = tiny_estimator(trained=True).deq
    result = benchmark(
        deq, n_examples=12, dataset="digits", eps=0.1, batch_size=6, n_dev=12, steps=2,
        attacks="pgd,autoattack:iterations=2,queries=5,target_classes=2,square:queries=5",
        long_steps=3,
        diagnostic_samples=2, bptt=False, sweep=SWEEP,
    )  # fmt: skip
    report = result.report
    assert report.mode == "verdict" and report.settings["n_test"] == 12
    assert set(report.audit) == {"final", "early", "ensemble"}
    assert set(report.to_json()["cost"]["expected_f_evals"]) == {
        "early_exit", "sweep", "clean", "columns"
    }
    best = max(report.robustness(), key=lambda r: r.robust)
    assert (result.defense, result.robust_accuracy) == (best.defense, best.accuracy)
    assert result.verdict.shape == (12,) and result.verdict.mean() == result.robust_accuracy
    assert result.clean_accuracy == np.mean(report.clean[result.defense])
    assert result.robust_accuracy <= result.clean_accuracy
    assert set(result.verdicts) == {"final", "early", "ensemble"}
    assert report.settings["config"]["eps"] == 0.1 and report.settings["config"]["step"] == 0.025
    text = repr(result)  # short: the interval and n*, not the whole report
    assert len(text) < 200 and str(result.robustness) in text
    assert f"n*={report.early_exit}" in text and "n=12" in text and "reduced budgets" in text
    card = result.model_info(name="tiny DEQ", architecture="small_conv_deq")
    assert list(card)[:12] == list(MODEL_INFO_FIELDS)[:12]
    assert card["clean_acc"] == f"{100 * result.clean_accuracy:.2f}"
    assert card["autoattack_acc"] == f"{100 * result.robust_accuracy:.2f}"
    assert card["dataset"] == "digits" and card["eps"] == "0.1" and card["link"] is None
    assert "REDUCED" in card["footnote"] and card["name"] == "tiny DEQ"
    with pytest.raises(ValueError, match="unknown model_info fields"):
        result.model_info(nme="typo")
    with pytest.raises(ValueError, match="threat_model must be one of Linf, L2"):
        benchmark(deq, 12, "digits", "L1")
    cost = benchmark(
        deq, n_examples=12, dataset="digits", eps=0.1, batch_size=6, n_dev=12, steps=2,
        bptt=False, sweep=SWEEP, dry_run=True, progress=None,
    )  # fmt: skip
    assert isinstance(cost, dict) and cost["expected_wall_s"] > 0 and cost["bound"]
    with pytest.raises(ValueError, match="too few"):
        benchmark(deq, 590, "digits", n_dev=10)
    with pytest.raises(ValueError, match="eps is required"):
        benchmark(deq, 10, "some/file.npz")
    with pytest.raises(TypeError, match="a DEQ, a DEQEstimator or a ModelSpec"):
        benchmark(torch.nn.Linear(2, 2), 10, "digits")  # type: ignore[arg-type]


def test_default_config_is_verdict_mode_racing_sweep_and_fp32() -> None:
    config = EvaluationConfig()
    assert config.mode.value == "verdict" and config.precision == "fp32"
    assert config.sweep_mode.value == "racing" and config.audit_size == 59
    assert config.compile_backend == "" and config.batch_size is None


def test_benchmark_reads_real_mnist_from_torchvisions_layout(tmp_path, shared_dir) -> None:
    """MNIST's test set as torchvision stores it (``MNIST/raw`` idx files, written here from
    the shared copy of the real t10k set) is what ``dataset="mnist"`` attacks."""
    source = shared_dir / "data" / "mnist_t10k.npz"
    if not source.is_file():
        pytest.skip(f"{source} absent")
    with np.load(source) as arrays:
        x, y = arrays["x"][:, 0], arrays["y"]
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = len(y)
    (raw / "t10k-images-idx3-ubyte").write_bytes(
        np.array([2051, n, 28, 28], ">i4").tobytes() + x.astype(np.uint8).tobytes()
    )
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        np.array([2049, n], ">i4").tobytes() + y.astype(np.uint8).tobytes()
    )
    # torchvision looks for the training files too (empty here: they are not read)
    (raw / "train-images-idx3-ubyte").write_bytes(np.array([2051, 0, 28, 28], ">i4").tobytes())
    (raw / "train-labels-idx1-ubyte").write_bytes(np.array([2049, 0], ">i4").tobytes())
    held_out = held_out_images("mnist", tmp_path)
    assert held_out.x.shape == (10000, 1, 28, 28) and held_out.num_classes == 10
    np.testing.assert_array_equal(held_out.x[:5] * 255, x[:5, None].astype(np.float32))
    np.testing.assert_array_equal(held_out.y, y)
    deq = small_conv_deq(in_channels=1, num_classes=10, channels=4, image_size=28)
    result = benchmark(
        deq, n_examples=3, dataset="mnist", batch_size=3, n_dev=3, data_dir=tmp_path,
        steps=1, attacks="pgd", bptt=False, sweep=SWEEP, long_steps=2, diagnostic_samples=2,
    )  # fmt: skip
    assert result.eps == 0.3 and result.dataset == "mnist" and result.verdict.shape == (3,)
    assert not result.standard  # AutoAttack did not run
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        held_out_images("mnist", tmp_path / "nowhere")
