"""Any ``f(z, x)`` module as a DEQ: the plainest path in."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from deq_attacks.deq.model import DEQ


class WithStateShape(nn.Module):
    """``f`` with a zero initial state of a given shape: ``init_state(injection)`` is zeros
    (B, *state_shape) for states shaped unlike the injection. ``forward`` is ``f(z, injection)``.
    """

    def __init__(self, f: nn.Module, state_shape: tuple[int, ...]) -> None:
        super().__init__()
        shape = tuple(state_shape)
        if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"state_shape must be positive ints (without batch), got {shape}")
        self.f = f
        self.state_shape = shape

    def init_state(self, injection: Tensor) -> Tensor:
        """Zeros (B, *state_shape) with the injection's dtype and device."""
        return injection.new_zeros(injection.shape[0], *self.state_shape)

    def forward(self, z: Tensor, injection: Tensor) -> Tensor:
        return self.f(z, injection)

    def extra_repr(self) -> str:
        return f"state_shape={self.state_shape}"


def with_state_shape(f: nn.Module, state_shape: tuple[int, ...]) -> WithStateShape:
    """Wrap ``f`` so that ``z_0`` is zeros of ``state_shape`` (per sample)."""
    return WithStateShape(f, state_shape)


def from_f(
    f: nn.Module,
    head: nn.Module,
    *,
    injection: nn.Module | None = None,
    state_shape: tuple[int, ...] | None = None,
    **deq_kwargs: Any,
) -> DEQ:
    """A ``DEQ`` solving ``z = f(z, x)``, classified by ``head(z)``.

    Args:
        f: ``f(z, x) -> z``; it receives the input x itself unless ``injection`` is given
            (then ``f(z, injection(x))``). States may have any shape (B, *S).
        head: ``head(z) -> logits`` (B, classes).
        injection: an optional stem; default the identity.
        state_shape: the shape (without batch) of z when it differs from the input's (or the
            injection's); z_0 is zeros of that shape. Default: zeros shaped like the input.
        **deq_kwargs: passed to ``DEQ`` (solver, training_gradient, readout, resets,
            ``input_shape``: the sample shape the model is for, checked on every input).
    """
    layer = f if state_shape is None else with_state_shape(f, state_shape)
    return DEQ(layer, injection if injection is not None else nn.Identity(), head, **deq_kwargs)
