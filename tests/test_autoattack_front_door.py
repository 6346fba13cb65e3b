"""fra31's ``AutoAttack`` front door (``deq_attacks.autoattack``): fra31's arguments, ``bs=``,
``return_labels``, printing with ``verbose`` and ``log_path``, over pyautoattack's attack code
(the same adversarial examples as calling pyautoattack directly)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyautoattack
import pytest
import torch
from attack_fixtures import correct_tensor_batch, make_white_box

from deq_attacks import Unrolled
from deq_attacks.autoattack import AutoAttack

pytestmark = pytest.mark.filterwarnings("ignore::deq_attacks.deq.convergence.NotConvergedWarning")


def test_fra31_call_runs_pyautoattacks_code_and_prints(capsys, tmp_path: Path) -> None:
    model = make_white_box(Unrolled(n=2, k=1, lam=1.0))
    x, y = correct_tensor_batch(4)
    log = tmp_path / "aa.log"
    assert not logging.getLogger("auto-attack").handlers  # no logging set up
    adversary = AutoAttack(model, "Linf", 0.15, 0, True, ["apgd-ce"], "custom", device="cpu",
                           log_path=log)  # fmt: skip
    adversary.apgd.n_iter = 3  # fra31 users set sub-attack attributes this way
    adversary.apgd.n_restarts = 1
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=2, return_labels=True)
    printed = capsys.readouterr().out
    assert "robust accuracy" in printed and "apgd-ce" in printed
    assert "robust accuracy" in log.read_text()
    assert not logging.getLogger("auto-attack").handlers  # removed again

    reference = pyautoattack.AutoAttack(
        model, attacks=["apgd-ce"], device="cpu", eps=0.15, norm="Linf", seed=0, version="custom"
    )
    reference.apgd.n_iter = 3
    reference.apgd.n_restarts = 1
    expected, _ = reference.run_standard_evaluation(x, y, batch_size=2)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=0)
    assert (x_adv - x).abs().max() <= 0.15 + 1e-6
    assert torch.equal(y_adv, model(x_adv).argmax(1))

    quiet = AutoAttack(model, eps=0.15, version="custom", attacks_to_run=["apgd-ce"],
                       seed=0, verbose=False, device="cpu")  # fmt: skip
    quiet.apgd.n_iter, quiet.apgd.n_restarts = 3, 1
    only_x = quiet.run_standard_evaluation(x, y, bs=4)
    assert isinstance(only_x, torch.Tensor) and capsys.readouterr().out == ""


def test_fra31_argument_rules() -> None:
    model = make_white_box()
    with pytest.raises(ValueError, match="version='custom'"):
        AutoAttack(model, attacks_to_run=["apgd-ce"], version="standard", device="cpu")
    with pytest.raises(ValueError, match="is_tf_model"):
        AutoAttack(model, is_tf_model=True, device="cpu")
    adversary = AutoAttack(model, eps=8 / 255, version="standard", verbose=False, device="cpu")
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert adversary.square.n_queries == 5000 and adversary.apgd.n_iter == 100
