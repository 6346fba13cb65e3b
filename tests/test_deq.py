"""Tests of the DEQ module: readouts (Final / Early / Ensemble) against states recomputed from a
kept solve, divergence warnings and errors, input validation, and variational dropout kept
fixed during one solve."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from deq_attacks.deq import (
    DEQ,
    Early,
    Ensemble,
    Final,
    ImplicitGradient,
    PhantomGradient,
    SolverDivergedError,
    VariationalDropout,
)
from deq_attacks.numerics import damped_unroll
from deq_attacks.solvers import Broyden, FixedPointIteration, Solver

D64 = torch.float64


class TanhF(nn.Module):
    """``f(z, inj) = tanh(W z + inj)`` with ``||W||_2 = norm`` (contractive for norm < 1)."""

    def __init__(self, d: int, norm: float = 0.6, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(norm / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(self.dropout(self.lin(z)) + inj)


def _tanh_deq(
    d: int = 6, features: int = 4, classes: int = 3, dtype: torch.dtype = D64, **kwargs: object
) -> DEQ:
    deq = DEQ(TanhF(d), nn.Linear(features, d), nn.Linear(d, classes), **kwargs)  # type: ignore[arg-type]
    return deq.to(dtype)


def _x(batch: int = 4, features: int = 4, dtype: torch.dtype = D64) -> Tensor:
    """Inputs of very different scales, so samples stop at different steps."""
    scale = torch.tensor([0.01, 0.3, 1.0, 3.0], dtype=dtype)[:batch, None]
    return scale * torch.randn(batch, features, dtype=dtype)


# --- 6. readouts ------------------------------------------------------------------------------


def test_readouts_match_states_of_a_kept_solve() -> None:
    deq = _tanh_deq(solver=Broyden(threshold=8, tol=1e-5)).eval()
    x = _x()
    with torch.no_grad():
        inj = deq.inject(x)
        traj = deq.solve(inj, keep=True)
        steps = traj.steps.tolist()
        assert len(set(steps)) > 1, f"samples should stop at different steps, got {steps}"
        for n in range(1, 9):
            expected = deq.head(traj.state(n))
            torch.testing.assert_close(deq(x, readout=Early(n)), expected, rtol=0, atol=1e-14)
        # beyond a sample's own stop, Early(n) gives its last iterate
        last = torch.stack([traj.state(s)[i] for i, s in enumerate(steps)])
        torch.testing.assert_close(deq(x, readout=Early(8)), deq.head(last), rtol=0, atol=1e-14)
        means = torch.stack(
            [
                torch.stack([traj.state(n)[i] for n in range(1, s + 1)]).mean(0)
                for i, s in enumerate(steps)
            ]
        )
        torch.testing.assert_close(deq(x, readout=Ensemble()), deq.head(means), rtol=0, atol=1e-14)
        final = deq.head(deq.f(traj.final, inj))
        torch.testing.assert_close(deq(x), final, rtol=0, atol=1e-14)
        torch.testing.assert_close(deq(x, readout=Final()), final, rtol=0, atol=1e-14)
        # the Early/Ensemble forwards keep O(1) states
        deq(x, readout=Early(5))
        assert deq.last_trajectory is not None
        assert set(deq.last_trajectory.states) <= {5, max(steps)}
        assert len(deq.last_trajectory.states) == 1
        deq(x, readout=Ensemble())
        assert deq.last_trajectory.states == {}
    # the default readout is used by forward
    early = _tanh_deq(solver=Broyden(threshold=8, tol=1e-5), readout=Early(2))
    early.load_state_dict(deq.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(early(x), deq.head(traj.state(2)), rtol=0, atol=1e-14)


def test_final_readout_with_phantom_gradient_is_damped_unroll() -> None:
    deq = _tanh_deq(
        solver=Broyden(threshold=8, tol=1e-6), training_gradient=PhantomGradient(k=3, lam=0.5)
    )
    x = _x()
    with torch.no_grad():
        inj = deq.inject(x)
        z_star = deq.solve(inj).final
        expected = deq.head(damped_unroll(lambda z: deq.f(z, inj), z_star, 3, 0.5))
        torch.testing.assert_close(deq(x), expected, rtol=0, atol=1e-14)
    # the unroll is not a no-op: a plain f(z*) readout differs from it
    assert not torch.allclose(expected, deq.head(deq.f(z_star, inj)), rtol=0, atol=1e-9)


def test_output_does_not_depend_on_grad_mode() -> None:
    deq = _tanh_deq(solver=Broyden(threshold=8, tol=1e-6))
    x = _x()
    with torch.no_grad():
        plain = deq(x)
    torch.testing.assert_close(deq(x.requires_grad_()).detach(), plain, rtol=0, atol=1e-14)


def test_early_beyond_threshold_raises() -> None:
    with pytest.raises(ValueError, match=r"Early\(n=9\) is beyond the solver's threshold of 8"):
        _tanh_deq(solver=Broyden(threshold=8), readout=Early(9))
    deq = _tanh_deq(solver=Broyden(threshold=8))
    with pytest.raises(ValueError, match=r"Early\(n=9\) is beyond the solver's threshold of 8"):
        deq(_x(), readout=Early(9))
    with pytest.raises(ValueError, match=r"Early\(n\) needs an int n >= 1"):
        Early(0)
    with pytest.raises(ValueError, match=r"Early\(n\) needs an int n >= 1"):
        Early(2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("readout", [Early(2), Ensemble()], ids=["Early", "Ensemble"])
def test_non_final_readout_refuses_input_gradient(readout: Early | Ensemble) -> None:
    deq = _tanh_deq()
    x = _x().requires_grad_()
    with pytest.raises(RuntimeError, match="WhiteBoxModule"):
        deq(x, readout=readout)
    with torch.no_grad():  # no gradient wanted: fine
        assert deq(x, readout=readout).shape == (4, 3)
    deq(x.detach(), readout=readout)  # parameters may require grad; only the input matters


# --- 4. divergence in the DEQ -----------------------------------------------------------------


class _InfOnce(nn.Module):
    """``0.5 tanh(z) + inj``; its evaluation number ``call`` (0 = f(z_0)) is inf for sample 1."""

    def __init__(self, call: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=D64))
        self.call, self.calls = call, 0

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        out = self.scale * torch.tanh(z) + inj
        if self.calls == self.call:
            out = out.clone()
            out[1] = float("inf")
        self.calls += 1
        return out


@pytest.mark.parametrize(
    "solver",
    [Broyden(threshold=8, tol=0.0), FixedPointIteration(threshold=8, tol=0.0)],
    ids=["Broyden", "FixedPointIteration"],
)
def test_divergence_warns_or_raises(solver: Solver) -> None:
    x = torch.randn(3, 4, dtype=D64)
    deq = DEQ(_InfOnce(call=3), nn.Identity(), nn.Linear(4, 2).to(D64), solver=solver)
    with torch.no_grad(), pytest.warns(UserWarning, match="diverged .* for 1 of 3 samples"):
        logits = deq(x)
    traj = deq.last_trajectory
    assert traj is not None
    assert traj.diverged.tolist() == [False, True, False]
    assert traj.steps.tolist() == [8, 2, 8]
    assert torch.isfinite(traj.final).all()
    assert torch.isfinite(logits).all()
    clean = DEQ(_InfOnce(call=-1), nn.Identity(), deq.head, solver=solver)
    with torch.no_grad():
        clean_logits = clean(x)
    torch.testing.assert_close(logits[[0, 2]], clean_logits[[0, 2]], rtol=0, atol=1e-12)

    strict = DEQ(_InfOnce(call=3), nn.Identity(), deq.head, solver=solver, raise_on_divergence=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raising, not warning
        with torch.no_grad(), pytest.raises(SolverDivergedError, match="1 of 3 samples"):
            strict(x)
    assert issubclass(SolverDivergedError, RuntimeError)


# --- 10. bad DEQ inputs -----------------------------------------------------------------------


def test_bad_inputs_raise() -> None:
    deq = _tanh_deq()
    x = _x()
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        deq(bad)
    with pytest.raises(TypeError, match="x must be floating point, got torch.int64"):
        deq(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"non-empty batch \(B, \.\.\.\), got shape \(4,\)"):
        deq(x[0])
    with pytest.raises(ValueError, match="non-empty batch"):
        deq(x[:0])
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        deq([[0.0] * 4])  # type: ignore[arg-type]
    deq32 = _tanh_deq(dtype=torch.float32)
    with pytest.raises(
        TypeError, match="x has dtype torch.float64 but the model's parameters are torch.float32"
    ):
        deq32(x)
    with pytest.raises(TypeError, match="unknown defense 'final'.*Final.*Early.*Ensemble"):
        deq(x, readout="final")  # type: ignore[arg-type]
    parts = (TanhF(6), nn.Linear(4, 6), nn.Linear(6, 3))
    with pytest.raises(TypeError, match="unknown defense 'final'.*Final.*Early.*Ensemble"):
        DEQ(*parts, readout="final")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="solver must be a deq_attacks Solver"):
        DEQ(*parts, solver="broyden")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="training_gradient must be ImplicitGradient"):
        DEQ(*parts, training_gradient="phantom")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backward_solver must be a Solver"):
        ImplicitGradient(backward_solver=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"k \(unrolling steps\) must be an int >= 1"):
        PhantomGradient(k=0)
    with pytest.raises(ValueError, match=r"lambda \(damping\) must be in \(0, 1\]"):
        PhantomGradient(lam=1.5)
    with pytest.raises(RuntimeError, match="no forward pass"):
        deq.relative_residuals()
    with torch.no_grad():
        deq(x)
    assert deq.last_trajectory is not None
    assert deq.relative_residuals() is deq.last_trajectory.residuals


# --- 11. variational dropout ------------------------------------------------------------------


def _dropout_deq(dropout: nn.Module) -> DEQ:
    return DEQ(
        TanhF(16, norm=0.5, dropout=dropout),
        nn.Linear(4, 16),
        nn.Linear(16, 3),
        solver=Broyden(threshold=40, tol=1e-11),
    ).to(D64)


def test_variational_dropout_mask_is_fixed_within_a_solve_and_resampled_between() -> None:
    drop = VariationalDropout(p=0.5)
    deq = _dropout_deq(drop).train()
    x = _x()
    deq(x).sum().backward()
    traj = deq.last_trajectory
    assert traj is not None
    assert traj.converged.all(), traj.residuals[:, -1]
    assert drop.mask is not None
    mask1 = drop.mask.clone()
    assert (mask1 == 0).any() and (mask1 == 2).any()
    # the answer is a fixed point of f with that one mask
    inj = deq.inject(x).detach()
    with torch.no_grad():
        fz = deq.step(traj.final, inj)
    assert ((fz - traj.final).norm(dim=-1) <= 1e-10 * fz.norm(dim=-1)).all()
    assert torch.equal(drop.mask, mask1)

    deq(x)
    assert drop.mask is not None
    assert not torch.equal(drop.mask, mask1), "a new forward must sample a new mask"
    assert deq.last_trajectory is not None and deq.last_trajectory.converged.all()

    deq.eval()  # no mask in eval mode: the fixed point of the undropped f
    with torch.no_grad():
        inj = deq.inject(x)
        z_eval = deq.solve(inj).final
        torch.testing.assert_close(z_eval, torch.tanh(deq.f.lin(z_eval) + inj), rtol=0, atol=1e-9)


def test_ordinary_dropout_breaks_the_fixed_point() -> None:
    """The control: nn.Dropout resamples at every call, so the same solve does not converge
    (this shows that the test above can tell the difference)."""
    deq = _dropout_deq(nn.Dropout(p=0.5)).train()
    with torch.no_grad():
        deq(_x())
    assert deq.last_trajectory is not None
    assert not deq.last_trajectory.converged.any()
    assert (deq.last_trajectory.residuals.min(dim=1).values > 1e-3).all()
