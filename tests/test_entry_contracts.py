"""Every entry point holds the contract: compute_loss refuses bad labels (and ART's own label
conversion, -1 to the last class, is documented here), the estimator refuses settings that
contradict the model or the machine, Foolbox bounds, batch sizes, benchmark()'s arguments, and
settings that would manufacture false findings (long_steps <= steps)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from art.utils import check_and_transform_label_format
from evaluation_fixtures import TINY, splits, tiny_estimator

from deq_attacks import DEQEstimator, DEQFoolboxModel
from deq_attacks.cli import main
from deq_attacks.evaluation import EvaluationConfig, benchmark
from deq_attacks.models import mlp_deq

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def data(n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    (x, y), _ = splits()
    return x[:n], y[:n]


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([True, False, True, False]), "dtype bool"),
        (np.array(["1", "2", "3", "4"]), "dtype <U1"),
        (np.array([1, 2, 3, None], dtype=object), "dtype object"),
        (np.array([0, 1, 2, 10]), "label 10 is outside"),
        (np.array([0, -1, 2, 3]), "label -1 is outside"),
        (np.eye(10, dtype=bool)[:4], "dtype bool"),
    ],
)
def test_compute_loss_refuses_bad_labels(labels: np.ndarray, match: str) -> None:
    x, _ = data()
    with pytest.raises((TypeError, ValueError), match=match):
        tiny_estimator().compute_loss(x, labels)


def test_compute_loss_of_good_labels_is_arts() -> None:
    estimator = tiny_estimator(trained=True)
    x, y = data()
    ours = estimator.compute_loss(x, y)
    art = PyTorchClassifier.compute_loss(estimator, x, y)
    np.testing.assert_allclose(ours, art)
    np.testing.assert_allclose(estimator.compute_loss(x, np.eye(10)[y]), ours, rtol=1e-6)


def test_arts_own_attacks_turn_label_minus_one_into_the_last_class() -> None:
    # ART converts labels itself before this package sees them: -1 one-hot encodes as class 9
    assert check_and_transform_label_format(np.array([-1]), nb_classes=10).argmax(1) == [9]
    estimator = tiny_estimator(trained=True)
    seen: list[np.ndarray] = []
    real = estimator.loss_gradient

    def spy(x, y, **kwargs):
        seen.append(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
        return real(x, y, **kwargs)

    estimator.loss_gradient = spy  # type: ignore[method-assign]
    x, _ = data()
    attack = ProjectedGradientDescent(estimator, eps=0.1, eps_step=0.05, max_iter=1, verbose=False)
    attack.generate(x, y=np.full(len(x), -1))
    assert seen and all((labels.argmax(1) == 9).all() for labels in seen)
    with pytest.raises(ValueError, match="label -1 is outside"):  # our entry points refuse it
        real(x, np.full(len(x), -1))


def test_the_estimator_refuses_classes_and_shapes_that_contradict_the_model() -> None:
    deq = tiny_estimator().deq
    with pytest.raises(
        ValueError, match=r"nb_classes is 5, but the DEQ returns logits of shape \(10,\)"
    ):
        DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=5)
    with pytest.raises(ValueError, match=r"does not run on one input of input_shape \(1, 8, 9\)"):
        DEQEstimator(deq, input_shape=(1, 8, 9), nb_classes=10)
    declared = mlp_deq(64, 10, hidden=8, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"contradicts the DEQ's own input_shape \(1, 8, 8\)"):
        DEQEstimator(declared, input_shape=(64,), nb_classes=10)
    assert DEQEstimator(declared, input_shape=(1, 8, 8), nb_classes=10).nb_classes == 10


@NO_CUDA
def test_device_type_gpu_without_cuda_is_refused_not_run_on_the_cpu() -> None:
    deq = tiny_estimator().deq
    with pytest.raises(ValueError, match="no CUDA device"):
        DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=10, device_type="gpu")
    with pytest.raises(ValueError, match="device_type must be 'cpu' or 'gpu'"):
        DEQEstimator(deq, input_shape=(1, 8, 8), nb_classes=10, device_type="cuda")


@pytest.mark.parametrize("bounds", [(1, 0), (0, 0), (0, float("inf")), (0,), "01"])
def test_foolbox_bounds_must_be_a_low_high_pair(bounds) -> None:
    with pytest.raises(ValueError, match="bounds must be"):
        DEQFoolboxModel(tiny_estimator().deq, bounds=bounds)


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-1, ValueError), ("8", TypeError)])
def test_predict_and_fit_refuse_a_batch_size_below_one(batch_size, error) -> None:
    estimator = tiny_estimator()
    x, y = data()
    with pytest.raises(error, match="batch_size must be an int >= 1"):
        estimator.predict(x, batch_size=batch_size)
    with pytest.raises(error, match="batch_size must be an int >= 1"):
        estimator.fit(x, y, batch_size=batch_size, nb_epochs=1)


def test_benchmark_refuses_a_text_eps() -> None:
    with pytest.raises(TypeError, match="eps must be a number, got '0.1'"):
        benchmark(tiny_estimator().deq, n_examples=4, dataset="digits", eps="0.1")


@NO_CUDA
def test_benchmark_refuses_cuda_without_a_gpu() -> None:
    with pytest.raises(ValueError, match="device 'cuda': no CUDA device"):
        benchmark(tiny_estimator().deq, n_examples=4, dataset="digits", device="cuda")
    with pytest.raises(ValueError, match="is not a torch device"):
        benchmark(tiny_estimator().deq, n_examples=4, dataset="digits", device="gpu0")


def test_long_steps_must_exceed_steps_before_any_work(capsys) -> None:
    with pytest.raises(ValueError, match=r"long_steps \(20\) must be more than steps \(40\)"):
        EvaluationConfig(steps=40, long_steps=20)
    with pytest.raises(ValueError, match="long_steps"):
        dataclasses.replace(TINY, long_steps=TINY.steps)
    argv = ["evaluate", "--model.name", "mlp_deq", "--preset", "mnist", "--long-steps", "20"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "long_steps (20) must be more than steps (40)" in err[0]
