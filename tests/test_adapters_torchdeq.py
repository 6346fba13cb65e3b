"""A DEQ built with torchdeq (its layer with torchdeq's weight norm and variational dropout, its
core's solver and gradient settings), trained a few steps and evaluated white-box through
``from_torchdeq``; the Exact estimate matches finite differences on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchdeq
from art.attacks.evasion import ProjectedGradientDescent
from torch import Tensor, nn
from torchdeq.dropout import VariationalDropout2d
from torchdeq.norm import apply_norm

from deq_attacks import (
    Anderson,
    Broyden,
    DEQEstimator,
    Exact,
    FixedPointIteration,
    ImplicitGradient,
    PhantomGradient,
    StopMode,
)
from deq_attacks.adapters.torchdeq import (
    from_torchdeq,
    torchdeq_solver,
    torchdeq_training_gradient,
)
from deq_attacks.data import load_digits

CHANNELS = 4


class Layer(nn.Module):
    """``f(z, x) = tanh(drop(conv(z)) + x)`` on (B, C, 8, 8), as a torchdeq user writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.drop = VariationalDropout2d(0.2, token_first=False)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.drop(self.conv(z)) + x)


def torchdeq_parts() -> tuple[Layer, nn.Module, nn.Module, nn.Module]:
    """Layer (weight-normed by torchdeq, contractive), encoder, head and core."""
    torch.manual_seed(0)
    layer = Layer()
    apply_norm(layer, "weight_norm")
    with torch.no_grad():
        layer.conv.weight_g.mul_(0.4)
    encoder = nn.Conv2d(1, CHANNELS, 3, padding=1)
    head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 64, 10))
    core = torchdeq.get_deq(
        core="indexing",
        f_solver="anderson",
        f_max_iter=60,
        f_tol=1e-12,
        f_stop_mode="abs",
        ift=True,
        b_solver="broyden",
        b_max_iter=60,
        b_tol=1e-12,
    )
    return layer, encoder, head, core


def test_core_settings_map_to_our_solver_and_training_gradient() -> None:
    core = torchdeq.get_deq(f_solver="broyden", f_max_iter=17, f_tol=3e-4, f_stop_mode="rel")
    assert torchdeq_solver(core) == Broyden(threshold=17, tol=3e-4, stop_mode=StopMode.REL)
    assert torchdeq_training_gradient(core) == PhantomGradient(k=1, lam=1.0)
    core = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=9, eval_f_max_iter=20)
    assert torchdeq_solver(core) == FixedPointIteration(threshold=20, tol=1e-3, stop_mode="abs")
    core = torchdeq.get_deq(core="sliced", grad=5, tau=0.5)
    assert torchdeq_training_gradient(core) == PhantomGradient(k=5, lam=0.5)
    core = torchdeq.get_deq(ift=True, b_solver="anderson", b_max_iter=7, b_tol=1e-5)
    assert torchdeq_training_gradient(core) == ImplicitGradient(
        Anderson(threshold=7, tol=1e-5, stop_mode="abs", memory=6)
    )
    with pytest.warns(UserWarning, match="only the gradient of its last state"):
        torchdeq_training_gradient(torchdeq.get_deq(n_states=2, f_max_iter=8))
    with pytest.raises(TypeError, match="torchdeq DEQ core"):
        from_torchdeq(Layer(), nn.Identity(), nn.Identity(), nn.Linear(2, 2))


def test_torchdeq_alone_gives_no_input_gradient_in_eval_mode() -> None:
    """The gap the adapter fills (torchdeq issues #4 and #8)."""
    layer, encoder, head, core = torchdeq_parts()
    for module in (layer, encoder, head, core):
        module.eval()
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    inj = encoder(x)
    z_out, _ = core(lambda z: layer(z, inj), torch.zeros_like(inj))
    assert not z_out[-1].requires_grad  # no path from the output back to x


def test_norm_and_dropout_resets_are_honoured_before_each_solve() -> None:
    layer, encoder, head, core = torchdeq_parts()
    deq = from_torchdeq(layer, encoder, head, core).train()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        layer.conv.weight_v.mul_(2.0)  # a parameter update: the weight must be recomputed
        layer.conv.weight_g.mul_(0.5)
        deq.solve(deq.inject(x))
        first = layer.drop.mask.clone()
        deq.solve(deq.inject(x))
    v, g = layer.conv.weight_v, layer.conv.weight_g
    want = v * g / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(layer.conv.weight, want)
    assert layer.drop.mask is not None and not torch.equal(first, layer.drop.mask)


def test_torchdeq_deq_trains_and_is_evaluated_white_box_with_exact_matching_differences() -> None:
    layer, encoder, head, core = torchdeq_parts()
    deq = from_torchdeq(layer, encoder, head, core).double()
    assert isinstance(deq.training_gradient, ImplicitGradient)
    data = load_digits()
    x, y = data.x[:300].astype(np.float64), data.y[:300]
    estimator = DEQEstimator(
        deq,
        input_shape=(1, 8, 8),
        nb_classes=10,
        optimizer=torch.optim.Adam(deq.parameters(), lr=1e-2),
        estimate=Exact(Broyden(threshold=60, tol=1e-13)),
    )
    before = float((estimator.predict(x[200:]).argmax(1) == y[200:]).mean())
    g_before = layer.conv.weight_g.detach().clone()
    estimator.fit(x[:200], y[:200], batch_size=50, nb_epochs=3)
    after = float((estimator.predict(x[200:]).argmax(1) == y[200:]).mean())
    assert not torch.equal(g_before, layer.conv.weight_g)  # torchdeq's g is trained
    assert after > before + 0.2, (before, after)

    xb, yb = torch.from_numpy(x[200:204]), torch.from_numpy(y[200:204])
    grad = estimator.loss_gradient(xb, yb)
    residual = deq.relative_residuals()[:, -1]
    assert (residual < 1e-9).all()

    def loss(inputs: Tensor) -> float:
        with torch.no_grad():
            logits, _ = estimator.white_box.defended(inputs)
        return float(nn.functional.cross_entropy(logits, yb))

    gen = torch.Generator().manual_seed(0)
    h = 1e-5
    for _ in range(3):
        v = torch.randn(xb.shape, generator=gen, dtype=torch.float64)
        fd = (loss(xb + h * v) - loss(xb - h * v)) / (2 * h)
        assert abs(fd - float((grad * v).sum())) <= 1e-6 * abs(fd) + 1e-9

    # ART's PGD works in float32: evaluate the trained model in float32
    estimator = DEQEstimator(deq.float(), input_shape=(1, 8, 8), nb_classes=10, estimate=Exact())
    x_test, y_test = data.x[200:260], data.y[200:260]
    pgd = ProjectedGradientDescent(estimator, eps=0.1, eps_step=0.025, max_iter=5, verbose=False)
    x_adv = pgd.generate(x_test, y=y_test)
    clean = float((estimator.predict(x_test).argmax(1) == y_test).mean())
    robust = float((estimator.predict(x_adv).argmax(1) == y_test).mean())
    assert np.abs(x_adv - x_test).max() <= 0.1 + 1e-6
    assert robust < clean - 0.1, (clean, robust)
