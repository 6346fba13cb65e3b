"""Shared set-up for the attack-library tests: a tiny conv DEQ trained on real 8x8 digits,
and instruments that show which gradient an attack received.

The model is trained once per test process (``digits_deq`` is cached), through
``DEQEstimator.fit``, so ART's training loop over our estimator is exercised too. Test modules
import these helpers directly (no conftest needed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
from torch import Tensor

from deq_attacks import (
    DEQ,
    Broyden,
    DEQEstimator,
    DEQFoolboxModel,
    Exact,
    GradientEstimate,
    Readout,
    WhiteBoxModule,
)
from deq_attacks.data import load_digits
from deq_attacks.gradients import BackwardPass, Cotangent, constant_cotangent, input_gradient
from deq_attacks.models import small_conv_deq
from deq_attacks.solvers import Solver

#: Forward threshold of the fixture's Broyden solver (the Unrolled(n=N) of the paper uses it).
THRESHOLD = 6
#: Training images (the rest, 297, are held out).
N_TRAIN = 1500
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True, eq=False)
class DigitsDEQ:
    """The trained model and its data.

    Attributes:
        deq: the trained DEQ, in eval mode (do not train it further in a test).
        x_test, y_test: held-out digits, float32 (297, 1, 8, 8) in [0, 1] and int64 (297,).
        clean_accuracy: accuracy of the Final readout on the held-out digits.
        train_seconds: wall time of ``fit``.
    """

    deq: DEQ
    x_test: np.ndarray
    y_test: np.ndarray
    clean_accuracy: float
    train_seconds: float


@cache
def digits_deq() -> DigitsDEQ:
    """Train ``small_conv_deq(channels=8)`` on 1,500 real digits (Adam 3e-3, 4 epochs, batch 100)
    with ``DEQEstimator.fit``; cached, so it is trained once per process. Seeded locally; the
    global random state is restored afterwards."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data))
    train, test = data.subset(order).split(N_TRAIN)
    np_state = np.random.get_state()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        np.random.seed(0)
        deq = small_conv_deq(
            in_channels=1,
            num_classes=NUM_CLASSES,
            channels=8,
            image_size=8,
            solver=Broyden(threshold=THRESHOLD),
        )
        estimator = DEQEstimator(
            deq,
            input_shape=INPUT_SHAPE,
            nb_classes=NUM_CLASSES,
            optimizer=torch.optim.Adam(deq.parameters(), lr=3e-3),
        )
        start = time.perf_counter()
        estimator.fit(train.x, train.y, batch_size=100, nb_epochs=4)
        seconds = time.perf_counter() - start
    np.random.set_state(np_state)
    deq.eval()
    accuracy = float((estimator.predict(test.x).argmax(1) == test.y).mean())
    return DigitsDEQ(deq, test.x, test.y, accuracy, seconds)


def make_estimator(
    estimate: GradientEstimate | None = None, defense: Readout | None = None
) -> DEQEstimator:
    """A fresh ART estimator over the trained DEQ (default: Exact() and Final())."""
    return DEQEstimator(
        digits_deq().deq,
        input_shape=INPUT_SHAPE,
        nb_classes=NUM_CLASSES,
        estimate=estimate,
        defense=defense,
    )


def make_foolbox_model(
    estimate: GradientEstimate | None = None, defense: Readout | None = None
) -> DEQFoolboxModel:
    """A fresh Foolbox model over the trained DEQ (default: Exact() and Final())."""
    return DEQFoolboxModel(digits_deq().deq, estimate=estimate, defense=defense)


def make_white_box(
    estimate: GradientEstimate | None = None, defense: Readout | None = None
) -> WhiteBoxModule:
    """A fresh WhiteBoxModule over the trained DEQ, in eval mode."""
    return WhiteBoxModule(digits_deq().deq, estimate, defense).eval()


def correct_batch(size: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``size`` held-out digits (from position ``offset`` on) that the Final readout classifies
    correctly: x float32 (size, 1, 8, 8), y int64 (size,)."""
    model = digits_deq()
    x, y = model.x_test[offset:], model.y_test[offset:]
    with torch.no_grad():
        pred = make_white_box()(torch.from_numpy(x)).argmax(1).numpy()
    keep = np.flatnonzero(pred == y)[:size]
    assert keep.size == size, "not enough correctly classified held-out digits"
    return np.ascontiguousarray(x[keep]), np.ascontiguousarray(y[keep])


def correct_tensor_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``correct_batch`` as torch tensors."""
    x, y = correct_batch(size)
    return torch.from_numpy(x), torch.from_numpy(y)


def as_input(x: np.ndarray | Tensor) -> Tensor:
    """x as a detached float32 tensor (B, 1, 8, 8)."""
    if isinstance(x, Tensor):
        return x.detach().to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def defended_predictions(
    x: np.ndarray | Tensor, estimate: GradientEstimate | None = None, defense: Readout | None = None
) -> np.ndarray:
    """Class predictions (B,) of the trained DEQ under ``defense`` (computed independently of
    any attack library)."""
    with torch.no_grad():
        return make_white_box(estimate, defense)(as_input(x)).argmax(1).numpy()


def direct_input_gradient(
    estimate: GradientEstimate, x: np.ndarray | Tensor, cotangent: Cotangent
) -> Tensor:
    """dL/dx (shaped like x) by ``estimate``, computed with ``input_gradient`` alone."""
    return input_gradient(digits_deq().deq, estimate, as_input(x), cotangent)


def defended_logits(x: np.ndarray | Tensor, defense: Readout | None = None) -> Tensor:
    """The defense's logits (B, classes), without gradient."""
    with torch.no_grad():
        return make_white_box(defense=defense)(as_input(x))


def ce_sum_cotangent(logits: Tensor, labels: Tensor) -> Tensor:
    """d/dlogits of the summed cross-entropy, softmax(logits) - onehot(labels) (B, classes),
    by autograd of ``cross_entropy`` as the attack libraries compute it (bit for bit: the
    Exact estimate's unconverged backward solve turns a 1e-7 change of its cotangent into a
    1e-2 change of small pixels' gradients)."""
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy(leaf, labels.long(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad


@dataclass
class SpyCall:
    """One call of a spied estimate: the cotangent it saw (at the head of the solver's answer)
    and the dL/d(injection) it returned."""

    cotangent: Tensor
    grad: Tensor


@dataclass(eq=False)
class SpyEstimate(GradientEstimate):
    """Wraps an estimate and records each ``injection_gradient`` call; otherwise identical."""

    inner: GradientEstimate = field(default_factory=Exact)
    calls: list[SpyCall] = field(default_factory=list)

    def check(self, solver: Solver) -> None:
        self.inner.check(solver)

    def keep_steps(self, threshold: int) -> bool | frozenset[int]:
        return self.inner.keep_steps(threshold)

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        grad = self.inner.injection_gradient(backward)
        deq, injection = backward.deq, backward.injection
        with torch.enable_grad():
            z = backward.trajectory.final.detach().requires_grad_()
            seen = backward.cotangent(deq.logits(z, injection.detach()))
        self.calls.append(SpyCall(seen.detach().clone(), grad.detach().clone()))
        return grad


@dataclass(eq=False)
class ZeroEstimate(GradientEstimate):
    """A poisoned estimate: dL/d(injection) = 0 always; counts its calls."""

    calls: int = 0

    def injection_gradient(self, backward: BackwardPass) -> Tensor:
        self.calls += 1
        return torch.zeros_like(backward.injection)


def as_numpy(a: np.ndarray | Tensor) -> np.ndarray:
    """A float64 numpy copy of an array or (possibly grad-carrying) tensor."""
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def linf_distance(adv: np.ndarray | Tensor, x: np.ndarray | Tensor) -> np.ndarray:
    """Per-sample max |adv - x| (B,)."""
    diff = as_numpy(adv) - as_numpy(x)
    return np.abs(diff.reshape(diff.shape[0], -1)).max(axis=1)


def l2_distance(adv: np.ndarray | Tensor, x: np.ndarray | Tensor) -> np.ndarray:
    """Per-sample L2 norm of adv - x (B,)."""
    diff = as_numpy(adv) - as_numpy(x)
    return np.linalg.norm(diff.reshape(diff.shape[0], -1), axis=1)


def assert_valid_adversarial(
    adv: np.ndarray | Tensor, x: np.ndarray | Tensor, eps: float | None, norm: str = "inf"
) -> None:
    """adv lies in [0, 1] and (when eps is given) within eps of x in the L-inf or L2 norm."""
    a = as_numpy(adv)
    assert a.shape == as_numpy(x).shape
    assert np.isfinite(a).all()
    assert a.min() >= 0.0 and a.max() <= 1.0, (a.min(), a.max())
    if eps is None:
        return
    if norm == "inf":
        assert linf_distance(a, x).max() <= eps + 1e-6
    else:
        assert l2_distance(a, x).max() <= eps + 1e-5


@dataclass
class Tap:
    """What one forward of a tapped module saw: its input x and, for each backward through
    it, the cotangent of its output (B, classes) and the gradient that reached x."""

    x: Tensor
    cotangents: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


def tap_gradients(module: torch.nn.Module) -> list[Tap]:
    """Record, with a forward hook (public torch API, the module itself is unchanged), every
    differentiable forward of ``module`` and every backward through it."""
    taps: list[Tap] = []

    def hook(_: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        (x,) = inputs
        if not (x.requires_grad and output.requires_grad):
            return
        tap = Tap(x.detach().clone())
        taps.append(tap)
        output.register_hook(lambda g: tap.cotangents.append(g.detach().clone()))
        x.register_hook(lambda g: tap.grads.append(g.detach().clone()))

    module.register_forward_hook(hook)
    return taps


def check_taps(
    taps: list[Tap], estimate: GradientEstimate, other: GradientEstimate, limit: int = 4
) -> int:
    """Assert that the gradient each recorded backward delivered to x equals ``estimate``'s
    ``input_gradient`` for the recorded cotangent (used straight-through), and differs from
    ``other``'s. Checks at most ``limit`` backwards, spread over the record; returns how many
    backwards were recorded in all."""
    pairs = [(t.x, c, g) for t in taps for c, g in zip(t.cotangents, t.grads)]
    assert all(len(t.cotangents) == len(t.grads) for t in taps)
    chosen = np.unique(np.linspace(0, len(pairs) - 1, min(limit, len(pairs))).round().astype(int))
    for index in chosen:
        x, cot, grad = pairs[index]
        expected = direct_input_gradient(estimate, x, constant_cotangent(cot))
        alternative = direct_input_gradient(other, x, constant_cotangent(cot))
        scale = expected.abs().max().item()
        if scale == 0:  # a zero cotangent (e.g. a sample whose loss is flat): nothing to tell
            torch.testing.assert_close(grad, expected)
            continue
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * scale)
        assert (grad - alternative).abs().max().item() > 1e-2 * scale
    return len(pairs)


def assert_sign_step_of(
    adv: torch.Tensor,
    x: torch.Tensor,
    step: float,
    estimate: GradientEstimate,
    cotangent: Cotangent,
) -> None:
    """``adv`` is one step ``clip(x + step * sign(g))`` with ``g`` the estimate's gradient for
    ``cotangent``, wherever the sign of ``g`` is decided (over 90% of the pixels)."""
    grad = direct_input_gradient(estimate, x, cotangent)
    decided = grad.abs() > 1e-6 * grad.abs().max()
    assert decided.float().mean() > 0.9
    predicted = (x + step * grad.sign()).clamp(0.0, 1.0)
    torch.testing.assert_close(adv[decided], predicted[decided], rtol=0, atol=1e-6)
