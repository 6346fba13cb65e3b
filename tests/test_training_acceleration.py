"""GPU paths, checked on CPU (deq_attacks.acceleration): torch.compile of f equals eager
execution within float tolerance (forward, the phantom and the implicit gradient, dropout, the
Jacobian penalty, a training run), channels-last too; with every option off nothing changes;
CUDA-only options are refused off CUDA before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deq_attacks import Broyden, ImplicitGradient, JacobianRegularization, PhantomGradient
from deq_attacks.acceleration import Acceleration
from deq_attacks.deq import DEQ, TrainingGradient
from deq_attacks.models import small_conv_deq
from deq_attacks.training import run_training
from tests.training_fixtures import tiny_preset


def _deq(gradient: TrainingGradient, dropout: float = 0.0) -> DEQ:
    torch.manual_seed(0)
    return small_conv_deq(
        in_channels=1,
        num_classes=10,
        channels=8,
        image_size=8,
        dropout=dropout,
        solver=Broyden(threshold=6, tol=1e-4),
        training_gradient=gradient,
    )


def _step(deq: DEQ, x: torch.Tensor, y: torch.Tensor, penalty: bool) -> tuple[torch.Tensor, list]:
    """Train-mode loss (cross-entropy, plus the Jacobian penalty if asked) and its parameter
    gradients, from the same random streams."""
    deq.train()
    torch.manual_seed(7)  # dropout mask and Hutchinson probes
    if penalty:
        logits, jac = deq.forward_with_penalty(x, JacobianRegularization(0.4))
        loss = F.cross_entropy(logits, y) + jac
    else:
        loss = F.cross_entropy(deq(x), y)
    return loss.detach(), list(torch.autograd.grad(loss, list(deq.parameters())))


@pytest.mark.parametrize(
    ("gradient", "dropout", "penalty"),
    [
        (PhantomGradient(5, 0.5), 0.0, False),
        (ImplicitGradient(Broyden(threshold=5, tol=1e-4)), 0.0, False),
        (PhantomGradient(5, 0.5), 0.2, True),
    ],
    ids=["phantom", "implicit", "phantom-dropout-penalty"],
)
def test_compiled_f_equals_eager(gradient: TrainingGradient, dropout: float, penalty: bool) -> None:
    """aot_eager traces f through dynamo and AOT autograd (the pipeline inductor compiles)
    without generating code: forward, training gradients and the penalty equal eager."""
    torch._dynamo.reset()
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    eager, compiled = _deq(gradient, dropout), _deq(gradient, dropout)
    keys = list(compiled.state_dict())
    Acceleration(compile=True, compile_backend="aot_eager").apply(compiled)
    assert list(compiled.state_dict()) == keys  # checkpoints keep their keys
    loss_e, grads_e = _step(eager, x, y, penalty)
    loss_c, grads_c = _step(compiled, x, y, penalty)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_f_equals_eager() -> None:
    """The real code generator (C++ on CPU, Triton on CUDA; a cold compile cache costs tens of
    seconds): eval-mode logits and the phantom gradient w.r.t. the input, float tolerance."""
    torch._dynamo.reset()
    x = torch.rand(6, 1, 8, 8)
    eager, compiled = _deq(PhantomGradient(5, 0.5)).eval(), _deq(PhantomGradient(5, 0.5)).eval()
    Acceleration(compile=True).apply(compiled)
    grads = []
    for deq in (eager, compiled):
        x_leaf = x.clone().requires_grad_()
        logits = deq(x_leaf)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, torch.arange(6)), x_leaf)
        grads.append((logits.detach(), grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-6)


def test_channels_last_equals_contiguous() -> None:
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    accel = Acceleration(channels_last=True)
    plain, converted = _deq(PhantomGradient(5, 0.5)), _deq(PhantomGradient(5, 0.5))
    accel.apply(converted)
    assert converted.f.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert accel.inputs(x).is_contiguous(memory_format=torch.channels_last)
    loss_p, grads_p = _step(plain, x, y, penalty=False)
    loss_c, grads_c = _step(converted, accel.inputs(x), y, penalty=False)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_options_off_change_nothing() -> None:
    """The default Acceleration: same module, same input object, no autocast, same numbers."""
    accel = Acceleration()
    assert not accel.active
    x = torch.rand(4, 1, 8, 8)
    deq = _deq(PhantomGradient(5, 0.5)).eval()
    with torch.no_grad():
        before = deq(x)
    forward = deq.f.forward
    assert accel.apply(deq) is deq and deq.f.forward == forward
    assert accel.inputs(x) is x
    with torch.no_grad(), accel.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.equal(deq(x), before)


def test_cuda_only_options_are_refused_off_cuda() -> None:
    for accel, message in [
        (Acceleration(bf16=True), "bf16 autocast is for CUDA only"),
        (Acceleration(tf32=True), "tf32 is a CUDA"),
        (Acceleration(compile=True, compile_mode="reduce-overhead"), "uses CUDA graphs"),
    ]:
        with pytest.raises(ValueError, match=message):
            accel.check("cpu")
        with pytest.raises(ValueError, match=message), accel.autocast("cpu"):
            pass
        accel.check("cuda")  # fine there
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        Acceleration(compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="apply only with compile=true"):
        Acceleration(compile_mode="max-autotune")
    with pytest.raises(ValueError, match="unknown compile backend 'fastest'; torch has"):
        Acceleration(compile=True, compile_backend="fastest").apply(_deq(PhantomGradient(5, 0.5)))


@pytest.mark.slow
def test_a_compiled_training_run_matches_the_eager_one(tmp_path: Path) -> None:
    """Two epochs (pretraining, then PGD-AT with the Jacobian penalty) with f compiled
    (aot_eager) end within float tolerance of the eager run, and keep its checkpoint layout."""
    torch._dynamo.reset()
    config = tiny_preset(
        "deq_large_exact_8_7", epochs=2, pretrain_steps=2, args={"channels": 8}, crop_padding=0
    )
    eager = run_training(config, tmp_path / "eager", log=lambda _: None)
    fast = config.updated(compile=True, compile_backend="aot_eager")
    compiled = run_training(fast, tmp_path / "compiled", log=lambda _: None)
    assert compiled.state.history[1]["jacobian_penalty"] is not None
    for a, b in zip(eager.state.history, compiled.state.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)

    def weights(run: Path) -> dict[str, torch.Tensor]:
        state = json.loads((run / "state.json").read_text())
        return load_file(str(run / "checkpoints" / state["checkpoint"] / "model.safetensors"))

    expected, got = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-5, msg=key)
