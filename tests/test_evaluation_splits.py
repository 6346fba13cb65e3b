"""The development and test splits of an evaluation: ranges, index files, validation, and the
held-out default that never reuses what ``deq-attacks train`` trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deq_attacks.evaluation import held_out_data
from deq_attacks.evaluation.presets import PRESETS, evaluation_preset
from deq_attacks.evaluation.settings import EvaluationConfig
from deq_attacks.splits import (
    DIGITS_TRAIN_POOL,
    TRAIN_FRACTION,
    choose_split,
    describe_indices,
    evaluation_pool,
    parse_range,
    read_indices,
)


def _arrays_file(path: Path, n: int, side: int = 6, test: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (n, side, side), dtype=np.uint8), "y": np.arange(n) % 10}
    if test is not None:
        arrays = {f"{k}_train": v for k, v in arrays.items()}
        arrays |= {
            "x_test": rng.integers(0, 256, (test, side, side), dtype=np.uint8),
            "y_test": np.arange(test) % 10,
        }
    np.savez(path, **arrays)
    return path


def test_describe_indices_writes_runs() -> None:
    assert describe_indices(np.array([3, 4, 5, 9, 11, 12])) == "3:6,9,11:13"
    assert describe_indices(np.arange(9800, 10000)) == "9800:10000"


def test_a_file_without_a_test_split_defaults_to_the_part_training_holds_out(
    tmp_path: Path,
) -> None:
    pool = evaluation_pool(str(_arrays_file(tmp_path / "mnist_like.npz", 50)))
    start = int(TRAIN_FRACTION * 50)
    np.testing.assert_array_equal(pool.held_out, np.arange(start, 50))
    split = choose_split(pool, n_dev=4, n_test=6)
    np.testing.assert_array_equal(split.dev_indices, np.arange(40, 44))
    np.testing.assert_array_equal(split.test_indices, np.arange(44, 50))
    np.testing.assert_array_equal(split.test.x, pool.data.x[44:50])
    record = split.record()
    assert record["development"] == "40:44" and record["test"] == "44:50"
    assert record["outside_held_out"] == {"development": 0, "test": 0}
    assert "first 80% (0:40)" in split.summary()


def test_the_default_test_split_is_disjoint_from_what_training_loads(tmp_path: Path) -> None:
    """Against the training data loader itself: no evaluated image is a training image."""
    from deq_attacks.training.config import TrainConfig
    from deq_attacks.training.data_loading import load_training_data

    path = _arrays_file(tmp_path / "single.npz", 60)
    training = load_training_data(TrainConfig().updated(source=str(path), dev_size=5))
    seen = {bytes(x.numpy().tobytes()) for x, _ in training.train}
    seen |= {bytes(x.numpy().tobytes()) for x in training.dev_x}
    split = choose_split(evaluation_pool(str(path)), n_dev=5, n_test=7)
    for data in (split.dev, split.test):
        assert not any(bytes(x.tobytes()) in seen for x in data.x)


def test_digits_and_files_with_a_test_split(tmp_path: Path) -> None:
    digits = evaluation_pool("digits")
    assert len(digits) == 1797 and digits.held_out[0] == DIGITS_TRAIN_POOL
    split = choose_split(digits)  # 100 and 100 by default
    assert describe_indices(split.dev_indices) == "1200:1300"
    assert describe_indices(split.test_indices) == "1300:1400"
    pool = evaluation_pool(str(_arrays_file(tmp_path / "both.npz", 30, test=12)))
    assert len(pool) == 12 and len(pool.held_out) == 12 and "test split" in pool.note


def test_ranges_and_index_files_choose_the_images(tmp_path: Path) -> None:
    pool = evaluation_pool(str(_arrays_file(tmp_path / "d.npz", 50)))
    text = tmp_path / "test.txt"
    text.write_text("# chosen test images\n3\n\n7\n 11 \n")
    npy = tmp_path / "dev.npy"
    np.save(npy, np.array([45, 2, 30]))
    split = choose_split(
        pool, dev=read_indices(npy, 50, "--dev-indices"), test=read_indices(text, 50, "--test")
    )
    assert split.dev_indices.tolist() == [45, 2, 30] and split.test_indices.tolist() == [3, 7, 11]
    assert split.outside_held_out() == {"development": 2, "test": 3}
    assert "make sure the model was not trained on them" in split.summary()
    # one split given: the other comes from the held-out images it does not use
    split = choose_split(pool, test=parse_range("40:45", 50, "--test-range"), n_dev=3)
    assert split.dev_indices.tolist() == [45, 46, 47]
    assert parse_range("48:", 50, "r").tolist() == [48, 49]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10:60", "reaches past the 50 images"),
        ("5:5", "empty or negative"),
        ("-2:4", "empty or negative"),
        ("abc", r"expected START:STOP"),
        ("10", r"expected START:STOP"),
    ],
)
def test_bad_ranges_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_range(text, 50, "--test-range")


def test_bad_index_files_and_overlaps_are_refused(tmp_path: Path) -> None:
    pool = evaluation_pool(str(_arrays_file(tmp_path / "d.npz", 50)))
    cases = {
        "dup.txt": ("1\n2\n1\n", "index 1 appears 2 times"),
        "far.txt": ("1\n50\n", "index 50 is outside the 50 images"),
        "neg.txt": ("-1\n", "index -1 is outside"),
        "word.txt": ("1\nseven\n", "line 2 is not an integer index: 'seven'"),
        "none.txt": ("# nothing\n", "no indices"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            read_indices(path, 50, "--test-indices")
    floats = tmp_path / "floats.npy"
    np.save(floats, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="indices must be integers"):
        read_indices(floats, 50, "--dev-indices")
    with pytest.raises(ValueError, match=r"share 5 images \(40:45\).*disjoint"):
        choose_split(pool, dev=np.arange(35, 45), test=np.arange(40, 50))
    with pytest.raises(ValueError, match="as indices or as a count, not both"):
        choose_split(pool, dev=np.arange(3), n_dev=3)


def test_counts_that_do_not_fit_are_refused() -> None:
    pool = evaluation_pool("digits")
    with pytest.raises(ValueError, match="number of test images must be at least 1, got 0"):
        choose_split(pool, n_test=0)
    with pytest.raises(ValueError, match="200 test images asked, but only 97 held-out"):
        choose_split(pool, n_dev=500, n_test=200)


def test_held_out_data_is_the_part_of_the_pool_training_leaves_out(tmp_path: Path) -> None:
    digits = held_out_data("digits")
    assert len(digits) == 1797 - DIGITS_TRAIN_POOL and digits.num_classes == 10
    np.testing.assert_array_equal(digits.x, evaluation_pool("digits").data.x[DIGITS_TRAIN_POOL:])
    path = str(_arrays_file(tmp_path / "single.npz", 50))
    np.testing.assert_array_equal(held_out_data(path).y, evaluation_pool(path).data.y[40:])
    with pytest.raises(FileNotFoundError, match="not 'digits'"):
        held_out_data(str(tmp_path / "missing.npz"))


def test_presets_set_threat_model_and_budgets() -> None:
    assert set(PRESETS) == {"cifar10_paper", "cifar10_l2", "mnist", "digits"}
    mnist = evaluation_preset("mnist").apply(EvaluationConfig())
    assert (mnist.eps, mnist.step, mnist.steps) == (0.3, 0.01, 40)
    assert mnist.attacks == EvaluationConfig().attacks  # the standard budgets
    paper = evaluation_preset("cifar10_paper").apply(EvaluationConfig(eps=0.5))
    assert paper == EvaluationConfig()  # the paper's setting is the default
    digits = evaluation_preset("digits").apply(EvaluationConfig())
    autoattack = digits.attack_specs[1]
    assert (digits.eps, digits.step, autoattack.iterations, autoattack.target_classes) == (
        0.1,
        0.025,
        5,
        2,
    )
    with pytest.raises(ValueError, match="unknown evaluation preset 'cifar'.*cifar10_paper"):
        evaluation_preset("cifar")
