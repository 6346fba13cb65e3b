"""Tests of the training gradients: the implicit gradient against closed forms (affine DEQ) and
central finite differences (tanh DEQ), the phantom gradient's convergence to it, and the
Jacobian tools (Hutchinson ||J||_F^2, power-iteration spectral radius, the regularisation
schedule and its effect on parameter gradients)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq_attacks.deq import (
    DEQ,
    ImplicitGradient,
    JacobianRegularization,
    PhantomGradient,
    TrainingGradient,
    hutchinson_frobenius,
    spectral_radius,
)
from deq_attacks.solvers import Broyden, Trajectory

D64 = torch.float64
TIGHT = Broyden(threshold=60, tol=1e-12)


def _matrix_with_norm(d: int, norm: float) -> Tensor:
    a = torch.randn(d, d, dtype=D64)
    return norm * a / torch.linalg.matrix_norm(a, ord=2)


class AffineF(nn.Module):
    """``f(z, inj) = A z + inj`` with ``||A||_2 = norm``."""

    def __init__(self, d: int, norm: float) -> None:
        super().__init__()
        self.A = nn.Parameter(_matrix_with_norm(d, norm))

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return z @ self.A.T + inj


class TanhF(nn.Module):
    """``f(z, inj) = tanh(W z + b + inj)`` with ``||W||_2 = norm``."""

    def __init__(self, d: int, norm: float) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d).to(D64)
        with torch.no_grad():
            self.lin.weight.copy_(_matrix_with_norm(d, norm))

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(self.lin(z) + inj)


def _affine_deq(gradient: TrainingGradient, d: int = 8, norm: float = 0.9) -> DEQ:
    return DEQ(
        AffineF(d, norm),
        nn.Linear(5, d),
        nn.Linear(d, 3),
        solver=TIGHT,
        training_gradient=gradient,
    ).to(D64)


def _data(batch: int = 4, features: int = 5) -> tuple[Tensor, Tensor]:
    return torch.randn(batch, features, dtype=D64), torch.randint(0, 3, (batch,))


def _closed_form_gradients(deq: DEQ, x: Tensor, y: Tensor) -> list[Tensor]:
    """d CE / d (x, W, b, A, H, h) for z* = (I - A)^{-1} (W x + b), logits = H z* + h."""
    assert isinstance(deq.f, AffineF)
    W, b = deq.injection.weight, deq.injection.bias
    H, h = deq.head.weight, deq.head.bias
    A = deq.f.A
    with torch.no_grad():
        eye = torch.eye(A.shape[0], dtype=D64)
        z_star = torch.linalg.solve(eye - A, (x @ W.T + b).T).T
        logits = z_star @ H.T + h
        p = (torch.softmax(logits, -1) - F.one_hot(y, 3).to(D64)) / x.shape[0]  # dL/dlogits
        u = torch.linalg.solve((eye - A).T, (p @ H).T).T  # u = (I - A)^{-T} dL/dz*
        return [u @ W, u.T @ x, u.sum(0), u.T @ z_star, p.T @ z_star, p.sum(0)]


def _gradients(deq: DEQ, x: Tensor, y: Tensor) -> list[Tensor]:
    x = x.clone().requires_grad_()
    assert isinstance(deq.f, AffineF)
    params = [deq.injection.weight, deq.injection.bias, deq.f.A, deq.head.weight, deq.head.bias]
    loss = F.cross_entropy(deq(x), y)
    return list(torch.autograd.grad(loss, [x, *params]))


def _relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    num = torch.cat([(g - w).flatten() for g, w in zip(got, want)]).norm()
    return float(num / torch.cat([w.flatten() for w in want]).norm())


# --- 7. the exact implicit gradient -----------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_implicit_gradient_matches_closed_form_on_affine_deq(train: bool) -> None:
    backward_solves: list[Trajectory] = []
    gradient = ImplicitGradient(backward_solver=TIGHT, on_backward=backward_solves.append)
    deq = _affine_deq(gradient).train(train)
    x, y = _data()
    got = _gradients(deq, x, y)
    want = _closed_form_gradients(deq, x, y)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-11)
    assert _relative_error(got, want) < 1e-9
    assert len(backward_solves) == 1 and backward_solves[0].converged.all()


def _central_difference(
    loss: Callable[[], float], t: Tensor, index: tuple[int, ...], h: float
) -> float:
    """(L(t + h e) - L(t - h e)) / 2h, perturbing ``t[index]`` in place and restoring it."""
    with torch.no_grad():
        orig = t[index].item()
        t[index] = orig + h
        up = loss()
        t[index] = orig - h
        down = loss()
        t[index] = orig
    return (up - down) / (2 * h)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_implicit_gradient_matches_finite_differences_on_tanh_deq(train: bool) -> None:
    d = 8
    deq = (
        DEQ(
            TanhF(d, 0.8),
            nn.Linear(5, d),
            nn.Linear(d, 3),
            solver=TIGHT,
            training_gradient=ImplicitGradient(backward_solver=TIGHT),
        )
        .to(D64)
        .train(train)
    )
    x, y = _data(batch=3)
    x_leaf = x.clone().requires_grad_()
    loss = F.cross_entropy(deq(x_leaf), y)
    gx, gw, gv = torch.autograd.grad(loss, [x_leaf, deq.f.lin.weight, deq.injection.weight])

    def loss_at() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(deq(x), y))

    h = 1e-5
    fd_x = torch.tensor(
        [
            [_central_difference(loss_at, x, (i, j), h) for j in range(x.shape[1])]
            for i in range(x.shape[0])
        ],
        dtype=D64,
    )
    rel_x = float((gx - fd_x).norm() / fd_x.norm())
    print(f"implicit vs central differences (h={h}), d/dx: relative error {rel_x:.2e}")
    assert rel_x < 1e-6, rel_x
    for weight, grad, index in [(deq.f.lin.weight, gw, (2, 5)), (deq.injection.weight, gv, (1, 3))]:
        fd = _central_difference(loss_at, weight, index, h)
        assert abs(grad[index].item() - fd) <= 1e-6 * abs(fd) + 1e-10, (grad[index].item(), fd)


# --- 8. phantom gradient -> exact gradient ----------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_phantom_gradient_approaches_exact_as_k_grows(lam: float) -> None:
    x, y = _data()
    errors = []
    for k in (1, 5, 20, 60):
        torch.manual_seed(0)  # the same model for every k
        deq = _affine_deq(PhantomGradient(k=k, lam=lam), norm=0.5).train()
        errors.append(_relative_error(_gradients(deq, x, y), _closed_form_gradients(deq, x, y)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2, "k=1 should be a visibly inexact gradient"
    assert errors[-1] < 1e-6, errors
    print(f"phantom lam={lam}: relative errors for k=1,5,20,60: {errors}")


# --- 9. Jacobian regularisation and diagnostics -----------------------------------------------


def test_hutchinson_frobenius_of_a_linear_map() -> None:
    d = 6
    M = torch.randn(d, d, dtype=D64)
    z = torch.randn(2, d, dtype=D64)

    def step(v: Tensor) -> Tensor:
        return v @ M.T

    exact = float(torch.linalg.matrix_norm(M) ** 2)
    estimate = hutchinson_frobenius(step, z, samples=4000, create_graph=False)
    assert estimate.shape == (2,)
    assert (abs(estimate - exact) <= 0.05 * exact).all(), (estimate, exact)
    # one probe is exactly ||eps^T J||^2 for the probe eps drawn
    torch.manual_seed(123)
    one = hutchinson_frobenius(step, z, samples=1, create_graph=False)
    torch.manual_seed(123)
    eps = torch.randn(2, d, dtype=D64)
    torch.testing.assert_close(one, (eps @ M).pow(2).sum(-1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        hutchinson_frobenius(step, z, samples=0)


def test_spectral_radius_of_a_symmetric_linear_map() -> None:
    d = 7
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=D64))
    eig = torch.tensor([-0.9, 0.6, 0.5, -0.4, 0.3, 0.1, 0.05], dtype=D64)
    M = Q @ torch.diag(eig) @ Q.T
    z = torch.randn(3, d, dtype=D64)
    radius = spectral_radius(lambda v: v @ M.T, z, iterations=100)
    expected = torch.linalg.eigvalsh(M).abs().max()
    torch.testing.assert_close(radius, expected.expand(3), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        spectral_radius(lambda v: v @ M.T, z, iterations=0)


def test_spectral_radius_of_tanh_deq_at_its_fixed_point_is_below_one() -> None:
    d = 8
    deq = DEQ(TanhF(d, 0.95), nn.Linear(5, d), nn.Linear(d, 3), solver=TIGHT).to(D64)
    x, _ = _data()
    with torch.no_grad():
        inj = deq.inject(x)
        z_star = deq.solve(inj).final
    radius = spectral_radius(lambda z: deq.step(z, inj), z_star, iterations=200)
    assert ((radius > 0) & (radius < 1)).all(), radius
    for i in range(x.shape[0]):  # within the true spectral norm of J_f(z*)
        inj_i = inj[i : i + 1]
        J = torch.autograd.functional.jacobian(
            lambda z, inj_i=inj_i: deq.step(z[None], inj_i)[0], z_star[i]
        )
        assert radius[i] <= torch.linalg.matrix_norm(J, ord=2) + 1e-9
        assert torch.linalg.matrix_norm(J, ord=2) < 0.95 + 1e-12


def test_forward_with_penalty_is_the_forward_plus_the_penalty_at_the_same_z_star() -> None:
    """Logits equal ``deq(x)``'s; the penalty equals ``reg.penalty`` at the solve's z* with the
    same probes; the gradient of CE + penalty equals the written-out reference and differs
    from CE alone; the module keeps no counter or penalty between calls."""
    d, weight = 6, 0.7
    reg = JacobianRegularization(weight=weight, samples=2)
    deq = (
        DEQ(
            TanhF(d, 0.9),
            nn.Linear(5, d),
            nn.Linear(d, 3),
            solver=Broyden(threshold=30, tol=1e-10),
            training_gradient=ImplicitGradient(backward_solver=Broyden(threshold=30, tol=1e-10)),
        )
        .to(D64)
        .train()
    )
    params = list(deq.parameters())
    x, y = _data()
    torch.manual_seed(1000)
    logits, penalty = deq.forward_with_penalty(x, reg)
    got = torch.autograd.grad(F.cross_entropy(logits, y) + penalty, params)
    # the reference: the same solve, the same probes, the loss written out
    torch.manual_seed(1000)
    inj = deq.inject(x)
    traj = deq.solve(inj)
    state = deq.training_gradient.attach(deq, traj.final, inj)
    ce = F.cross_entropy(deq.logits(state, inj), y)
    want_penalty = reg.penalty(lambda z: deq.step(z, inj), traj.final)
    plain = torch.autograd.grad(ce, params, retain_graph=True)
    want = torch.autograd.grad(ce + want_penalty, params)
    torch.testing.assert_close(penalty, want_penalty, rtol=1e-12, atol=0)
    assert penalty.item() > 0
    torch.testing.assert_close(logits, deq(x), rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert _relative_error(list(plain), list(want)) > 1e-3, "penalty has no effect"
    # the weight scales the penalty linearly (same probes)
    torch.manual_seed(1000)
    _, doubled = deq.forward_with_penalty(x, JacobianRegularization(weight=2 * weight, samples=2))
    torch.testing.assert_close(doubled, 2 * penalty.detach(), rtol=1e-12, atol=0)
    assert not hasattr(deq, "jacobian_regularization") and not hasattr(deq, "_training_forwards")
    with torch.no_grad(), pytest.raises(RuntimeError, match="enable gradients"):
        deq.forward_with_penalty(x, reg)
    with pytest.raises(TypeError, match="expected JacobianRegularization"):
        deq.forward_with_penalty(x, 0.4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": -0.1}, "weight must be a finite number >= 0"),
        ({"weight": float("nan")}, "weight must be a finite number >= 0"),
        ({"samples": 0}, "samples must be an int >= 1"),
    ],
)
def test_jacobian_regularization_bad_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        JacobianRegularization(**kwargs)  # type: ignore[arg-type]
