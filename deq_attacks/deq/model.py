"""The DEQ module: injection -> solver over f(z; x) -> trajectory -> readout -> head -> logits."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor, nn

from deq_attacks.deq.backward import ImplicitGradient, TrainingGradient
from deq_attacks.deq.contract import DEQModel, ResetHook
from deq_attacks.deq.dropout import reset_variational_dropout
from deq_attacks.deq.readout import Final, Readout, check_readout
from deq_attacks.deq.regularization import JacobianRegularization
from deq_attacks.numerics import ForwardRecord
from deq_attacks.solvers import Broyden, Solver, Trajectory


class SolverDivergedError(RuntimeError):
    """The forward solver produced NaN or inf for some sample."""


def _refuse_training_through(readout: Readout) -> Callable[[Tensor], Tensor]:
    """A backward hook on train-mode logits of a non-Final readout: raise instead of training
    the head alone."""

    def hook(grad: Tensor) -> Tensor:
        raise RuntimeError(
            f"cannot train through the {readout} readout: its state is a detached solver iterate, "
            "so only the head would get a gradient (f and the injection none). Train with "
            "readout=Final() (the training gradient) and choose Early/Ensemble as a defense at "
            "evaluation"
        )

    return hook


def check_input_shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """A declared sample shape as a tuple of positive ints (None stays None)."""
    if shape is None:
        return None
    out = tuple(shape)
    if not out or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in out):
        raise ValueError(f"input_shape must be positive ints (without batch), got {shape!r}")
    return out


class DEQ(DEQModel):
    """A deep equilibrium classifier: the implementation of the ``DEQModel`` contract.

    Args:
        f: ``f(z, injection) -> z`` on states (B, *S); may define ``init_state(injection)``
            (default: zeros shaped like the injection).
        injection: the stem, ``injection(x) -> injection``.
        head: ``head(z) -> logits`` (B, classes) on states (B, *S).
        solver: the forward solver (paper: Broyden, 8 iterates).
        training_gradient: how gradients reach the parameters (ImplicitGradient or
            PhantomGradient); used in train and eval mode.
        readout: the default defense (Final, Early(n) or Ensemble).
        raise_on_divergence: raise SolverDivergedError instead of warning when a sample's
            forward solve turns NaN or inf.
        resets: hooks called with ``f`` before each forward solve (default: reset the masks of
            ``VariationalDropout``); torchdeq models add its ``reset_norm`` and ``reset_dropout``.
        input_shape: the sample shape (without batch) the model was built for, e.g.
            ``(1, 28, 28)``; ``inject`` then refuses any other. None: not declared (any shape
            the injection accepts).

    After each forward, ``last_trajectory`` holds the solve (flat states (B, d)), for
    inspection only: no computation of this package reads it. The module keeps no training
    counters: a training step that carries the Jacobian penalty asks for it
    (``forward_with_penalty``).
    """

    def __init__(
        self,
        f: nn.Module,
        injection: nn.Module,
        head: nn.Module,
        *,
        solver: Solver | None = None,
        training_gradient: TrainingGradient | None = None,
        readout: Readout | None = None,
        raise_on_divergence: bool = False,
        resets: Sequence[ResetHook] = (reset_variational_dropout,),
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.f = f
        self.injection = injection
        self.head = head
        self.solver = solver if solver is not None else Broyden(threshold=8)
        if not isinstance(self.solver, Solver):
            raise TypeError(f"solver must be a deq_attacks Solver, got {self.solver!r}")
        self.training_gradient = training_gradient or ImplicitGradient()
        if not isinstance(self.training_gradient, TrainingGradient):
            raise TypeError(
                "training_gradient must be ImplicitGradient(...) or PhantomGradient(...), "
                f"got {self.training_gradient!r}"
            )
        self.readout = check_readout(readout if readout is not None else Final())
        self.readout.check(self.solver.threshold)
        self.raise_on_divergence = raise_on_divergence
        self.resets = tuple(resets)
        for hook in self.resets:
            if not callable(hook):
                raise TypeError(f"resets must be callables taking f, got {hook!r}")
        self.input_shape = check_input_shape(input_shape)
        self.last_trajectory: Trajectory | None = None
        self._state_shape: tuple[tuple[int, ...], torch.Size] | None = None

    # --- the pieces of the data flow, on flat states (B, d) -------------------------------

    def inject(self, x: Tensor) -> Tensor:
        """Validate the input batch (B, ...) and apply the injection (stem)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x has sample shape {tuple(x.shape[1:])}, but this DEQ was built for "
                f"{self.input_shape} (input_shape)"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        param = next(self.parameters(), None)
        if param is not None and x.dtype != param.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {param.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        return self.injection(x)

    def initial_state(self, injection: Tensor) -> Tensor:
        """``z_0`` (B, *S): ``f.init_state(injection)`` or zeros shaped like the injection."""
        init = getattr(self.f, "init_state", None)
        z0 = init(injection) if callable(init) else torch.zeros_like(injection)
        self._state_shape = (tuple(injection.shape), z0.shape[1:])
        return z0

    def _shape_for(self, injection: Tensor) -> torch.Size:
        if self._state_shape is None or self._state_shape[0] != tuple(injection.shape):
            self.initial_state(injection)
        assert self._state_shape is not None
        return self._state_shape[1]

    def step(self, z: Tensor, injection: Tensor) -> Tensor:
        """One application of f on flat states: (B, d) -> (B, d)."""
        shape = self._shape_for(injection)
        return self.f(z.reshape(z.shape[0], *shape), injection).reshape(z.shape[0], -1)

    def logits(self, z: Tensor, injection: Tensor) -> Tensor:
        """The head on a flat state (B, d) -> logits (B, classes)."""
        return self.head(z.reshape(z.shape[0], *self._shape_for(injection)))

    def reset(self) -> None:
        """Run the reset hooks on f (weight normalisation, dropout masks)."""
        for hook in self.resets:
            hook(self.f)

    def solve(
        self,
        injection: Tensor,
        keep: bool | Collection[int] = False,
        steps: int | None = None,
        *,
        record: ForwardRecord | None = None,
    ) -> Trajectory:
        """Reset, then run the forward solver from ``z_0`` without autograd; record the solve
        as ``last_trajectory`` and report divergence. ``steps`` (< threshold) stops the solver
        after that many iterates (they equal the first iterates of a full solve); a randomized
        threshold (``Solver.rand_delta``) is drawn for the full solve, then cut at ``steps``.
        ``record`` keeps every evaluation of f with its autograd graph, for a backward that
        reuses them."""
        self.reset()
        z0 = self.initial_state(injection).reshape(injection.shape[0], -1)
        solver = self.solver
        limit = solver.draw_threshold()  # a randomized threshold is drawn for the full solve
        if steps is not None and steps < solver.threshold:
            solver = dataclasses.replace(solver, threshold=steps, rand_delta=0)
        limit = min(limit, solver.threshold)
        if record is None:
            fn = lambda z: self.step(z, injection)  # noqa: E731
        else:
            fn = record.wrap(self.step, injection)
        trajectory = solver.solve(fn, z0.detach(), keep, limit=limit)
        self.last_trajectory = trajectory
        if trajectory.diverged.any():
            message = (
                f"forward solver diverged (NaN/inf) for {int(trajectory.diverged.sum())} of "
                f"{trajectory.diverged.numel()} samples; each was frozen at its last finite iterate"
            )
            if self.raise_on_divergence:
                raise SolverDivergedError(message)
            warnings.warn(message, stacklevel=3)
        return trajectory

    # --- the module -------------------------------------------------------------------------

    def forward(
        self, x: Tensor, readout: Readout | None = None, *, solve_steps: int | None = None
    ) -> Tensor:
        """Logits (B, classes) of the readout state (default: ``self.readout``).

        The Final readout is differentiable through the training gradient. Early and Ensemble
        states have no gradient of their own: in train mode, backpropagating through them
        raises (only the head would learn; f and the injection would get no gradient), and
        differentiating them w.r.t. the input needs a gradient estimate
        (``deq_attacks.WhiteBoxModule`` or ``DEQEstimator``).

        ``solve_steps`` (1..threshold) stops the forward solve after that many iterates, so
        the readout (and the training gradient of Final) starts from z_n, n = ``solve_steps``:
        the random-intermediate-state training of Yang et al. (2023) draws n per step.
        """
        logits, _ = self._forward(x, readout, None, solve_steps)
        return logits

    def forward_with_penalty(
        self,
        x: Tensor,
        regularization: JacobianRegularization,
        *,
        solve_steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The training forward of a step that carries the Jacobian penalty: the logits
        (B, classes) of ``forward(x, solve_steps=...)`` and ``regularization.penalty`` (a
        differentiable scalar) at the same solver answer; the caller adds the penalty to its
        loss."""
        if not isinstance(regularization, JacobianRegularization):
            raise TypeError(f"expected JacobianRegularization, got {regularization!r}")
        logits, penalty = self._forward(x, None, regularization, solve_steps)
        assert penalty is not None
        return logits, penalty

    def _forward(
        self,
        x: Tensor,
        readout: Readout | None,
        regularization: JacobianRegularization | None,
        solve_steps: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        readout = check_readout(readout if readout is not None else self.readout)
        readout.check(self.solver.threshold)
        if solve_steps is not None and (
            isinstance(solve_steps, bool)
            or not isinstance(solve_steps, int)
            or not 1 <= solve_steps <= self.solver.threshold
        ):
            raise ValueError(
                f"solve_steps must be an int in 1..{self.solver.threshold} (the solver's "
                f"threshold), got {solve_steps!r}"
            )
        if not isinstance(readout, Final) and torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"{readout} has no gradient of its own w.r.t. the input: wrap the model in "
                "deq_attacks.WhiteBoxModule (or DEQEstimator) to choose a gradient estimate"
            )
        injection = self.inject(x)
        # a readout that needs only the first iterates (Early(n)) stops the solver there
        horizon = None if self.training else readout.horizon(self.solver.threshold)
        if solve_steps is not None:
            horizon = solve_steps if horizon is None else min(horizon, solve_steps)
        trajectory = self.solve(injection, keep=readout.keep_steps(), steps=horizon)
        state = readout.state(self, trajectory, injection)
        logits = self.logits(state, injection)
        if not isinstance(readout, Final) and self.training and logits.requires_grad:
            logits.register_hook(_refuse_training_through(readout))
        penalty = None
        if regularization is not None:
            penalty = regularization.penalty(lambda z: self.step(z, injection), trajectory.final)
        return logits, penalty

    def relative_residuals(self) -> Tensor:
        """(B, N) relative residuals ``||f(z_n)-z_n|| / ||f(z_n)||`` of the last forward."""
        if self.last_trajectory is None:
            raise RuntimeError("no forward pass has been run yet")
        return self.last_trajectory.residuals
