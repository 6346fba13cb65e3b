"""A DEQ built with torchdeq, evaluated and trained here (``pip install deq-attacks[torchdeq]``).

A torchdeq model has three parts of its own: an encoder (our injection), a layer ``f(z, x)``
and a head; the torchdeq core (``torchdeq.get_deq(...)``) only runs the solver and attaches
the training gradient. ``from_torchdeq`` keeps the three parts (their parameters are shared,
not copied), replaces the core by our solver and training gradient with the same settings, and
calls torchdeq's own ``reset_norm`` and ``reset_dropout`` on f before each forward solve.

Mapping of the core's settings:

============================  ==============================================================
torchdeq                      deq-attacks
============================  ==============================================================
``f_solver``                  ``fixed_point_iter``, ``simple_fixed_point_iter`` ->
                              ``FixedPointIteration``; ``anderson`` -> ``Anderson(memory=6)``;
                              ``broyden`` -> ``Broyden``
``eval_f_max_iter``           ``threshold`` (``f_max_iter * eval_factor``; by default
                              ``f_max_iter``: the solve the model is evaluated with)
``f_tol``                     ``tol``
``f_stop_mode`` abs / rel     ``StopMode.ABS`` / ``StopMode.REL``
``ift`` / ``hook_ift``        ``ImplicitGradient(b_solver, b_max_iter, b_tol, b_stop_mode)``
``grad`` = k, ``tau``         ``PhantomGradient(k, lam=tau)``
============================  ==============================================================

torchdeq stops a batch when its worst sample converges and returns the lowest-residual
iterate; ours stops each sample on its own (one sample never changes another's result) and
also returns the lowest-residual iterate.

torchdeq reads its settings with ``args.get(name, default)`` and ignores every other name
without a word (its issue #12: ``stop_mode="rel"`` leaves ``f_stop_mode`` at ``"abs"``).
``torchdeq_core(**settings)`` builds a core through ``torchdeq.get_deq`` and refuses any name
torchdeq 0.1.0 does not read (``TORCHDEQ_SETTINGS``); ``from_torchdeq`` refuses a core whose
settings hold a near miss of one (``stop_mode``, ``f_max_iters``; other names are allowed,
since an argparse namespace passed to ``get_deq`` carries a script's own options too).
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any

from torch import nn

from deq_attacks.adapters.plain import with_state_shape
from deq_attacks.deq.backward import ImplicitGradient, PhantomGradient, TrainingGradient
from deq_attacks.deq.dropout import reset_variational_dropout
from deq_attacks.deq.model import DEQ
from deq_attacks.solvers import Anderson, Broyden, FixedPointIteration, Solver, StopMode

_SOLVERS: dict[str, Callable[..., Solver]] = {
    "fixed_point_iter": FixedPointIteration,
    "simple_fixed_point_iter": FixedPointIteration,
    "anderson_solver": lambda **kw: Anderson(memory=6, **kw),
    "broyden_solver": Broyden,
}


#: The settings torchdeq 0.1.0 reads (``args.get`` in ``core.py`` and ``norm/``); it ignores
#: any other name silently.
TORCHDEQ_SETTINGS = frozenset(
    {
        "core", "f_solver", "b_solver", "f_max_iter", "b_max_iter", "f_tol", "b_tol",
        "f_stop_mode", "b_stop_mode", "eval_f_max_iter", "eval_factor", "grad", "tau",
        "sup_gap", "sup_loc", "ift", "hook_ift", "n_states", "indexing", "norm_type",
        "norm_clip", "norm_clip_value", "norm_no_scale", "norm_target_norm",
        "sn_n_power_iters",
    }
)  # fmt: skip


def _near_misses(names: Collection[str]) -> dict[str, list[str]]:
    """Each name torchdeq does not read -> the settings it is close to (maybe none)."""
    return {
        name: difflib.get_close_matches(name, sorted(TORCHDEQ_SETTINGS), n=2, cutoff=0.75)
        for name in sorted(set(names) - TORCHDEQ_SETTINGS)
    }


def _dropped(found: Mapping[str, list[str]]) -> str:
    return ", ".join(
        f"{name!r}" + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else "")
        for name, near in found.items()
    )


def check_torchdeq_settings(settings: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every setting torchdeq 0.1.0 would silently ignore."""
    found = _near_misses(settings)
    if found:
        raise ValueError(
            f"torchdeq ignores the settings {_dropped(found)} without a word (its issue #12); "
            f"it reads: {', '.join(sorted(TORCHDEQ_SETTINGS))}"
        )


def torchdeq_core(**settings: Any) -> Any:
    """``torchdeq.get_deq(**settings)`` after refusing any setting it would ignore."""
    check_torchdeq_settings(settings)
    return _torchdeq().get_deq(**settings)


def _torchdeq() -> Any:
    try:
        import torchdeq
    except ImportError as error:  # pragma: no cover - the extra is installed in the tests
        raise ImportError(
            "the torchdeq adapter needs torchdeq: pip install 'deq-attacks[torchdeq]'"
        ) from error
    return torchdeq


def _solver(fn: Callable[..., Any], max_iter: int, tol: float, stop_mode: str) -> Solver:
    name = getattr(fn, "__name__", repr(fn))
    if name not in _SOLVERS:
        raise ValueError(
            f"torchdeq solver {name!r} has no counterpart here; use one of "
            "'fixed_point_iter', 'simple_fixed_point_iter', 'anderson' or 'broyden'"
        )
    return _SOLVERS[name](threshold=int(max_iter), tol=float(tol), stop_mode=StopMode(stop_mode))


def torchdeq_solver(core: Any) -> Solver:
    """Our forward solver with the settings of a torchdeq core (``DEQIndexing``/``DEQSliced``)."""
    return _solver(core.f_solver, core.eval_f_max_iter, core.f_tol, core.f_stop_mode)


def torchdeq_training_gradient(core: Any) -> TrainingGradient:
    """Our training gradient equal to the one a torchdeq core attaches to its last state:
    implicit differentiation (``ift``/``hook_ift``) or the phantom gradient (``grad``, ``tau``).

    Warns when the core supervises several states (``n_states``, ``indexing``, ``sup_gap``):
    only the last one has a counterpart here.
    """
    produce = list(core.produce_grad)
    last = produce[-1]
    name = getattr(last, "__name__", "")
    if len(produce) > 1 or name == "sup_gap_grad_func":
        warnings.warn(
            "the torchdeq core supervises several states (fixed-point correction); only the "
            "gradient of its last state is reproduced here",
            stacklevel=3,
        )
    if name in ("func_ift", "hook_ift_grad"):
        backward = _solver(core.b_solver, core.b_max_iter, core.b_tol, core.b_stop_mode)
        return ImplicitGradient(backward)
    closure = inspect.getclosurevars(last).nonlocals
    if "n_grad_step" not in closure or "tau" not in closure:
        raise ValueError(f"unrecognised torchdeq gradient function {name!r}")
    return PhantomGradient(k=int(closure["n_grad_step"]), lam=float(closure["tau"]))


def torchdeq_resets() -> tuple[Callable[[nn.Module], None], ...]:
    """Reset hooks of a torchdeq model: its weight (spectral) norm recomputation and its
    variational dropout masks, plus ours."""
    torchdeq = _torchdeq()
    return (reset_variational_dropout, torchdeq.norm.reset_norm, torchdeq.dropout.reset_dropout)


def from_torchdeq(
    f: nn.Module,
    injection: nn.Module,
    head: nn.Module,
    core: Any,
    *,
    state_shape: tuple[int, ...] | None = None,
    **deq_kwargs: Any,
) -> DEQ:
    """A ``DEQ`` over the parts of a torchdeq model.

    Args:
        f: the layer, ``f(z, injection) -> z`` (single-tensor states).
        injection: the encoder, ``injection(x) -> injection``.
        head: ``head(z) -> logits`` (B, classes).
        core: the torchdeq core the model was built with (``torchdeq.get_deq(...)``); its
            solver and gradient settings are mapped (see the module docs).
        state_shape: the shape (without batch) of z when it differs from the injection's;
            z_0 is zeros of that shape (torchdeq's usual ``torch.zeros``).
        **deq_kwargs: passed to ``DEQ`` (readout, resets, ``input_shape``: the sample shape
            the model is for, ...); ``solver`` or ``training_gradient`` given here override the
            mapped ones.
    """
    core_type = type(core).__name__
    if not hasattr(core, "f_solver") or not hasattr(core, "produce_grad"):
        raise TypeError(f"core must be a torchdeq DEQ core (get_deq(...)), got {core_type}")
    config = getattr(getattr(core, "args", None), "config", None)
    if isinstance(config, Mapping):
        near = {k: v for k, v in _near_misses(config).items() if v}
        if near:
            raise ValueError(
                f"the torchdeq core was built with {_dropped(near)}, which torchdeq ignored "
                "(its issue #12): its solver runs with the default instead; rebuild it with "
                "the name torchdeq reads (torchdeq_core(...) refuses unknown names)"
            )
    deq_kwargs.setdefault("solver", torchdeq_solver(core))
    if "training_gradient" not in deq_kwargs:
        deq_kwargs["training_gradient"] = torchdeq_training_gradient(core)
    deq_kwargs.setdefault("resets", torchdeq_resets())
    layer = f if state_shape is None else with_state_shape(f, state_shape)
    return DEQ(layer, injection, head, **deq_kwargs)
