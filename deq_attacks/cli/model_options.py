"""The builder contract behind the model options of ``deq-attacks evaluate`` (defined in
``deq_attacks.cli.evaluate``).

``--model`` is a registered name or a user's ``package.module:function`` (imported from the
working directory, as ``python -m`` would). The builder is called with keywords only, and an
option reaches it only if its signature takes it (``inspect.signature``; ``**kwargs`` counts):

============================  ===================================================================
option                        how it reaches the model
============================  ===================================================================
``--model_arg KEY=VALUE``     ``KEY=VALUE`` (a Python literal, else the text); refused unless the
                              builder takes ``KEY``
``--solver NAME[:K=V,...]``   ``solver=`` if the builder takes it (the built model must then use
                              it); otherwise set on the built DEQ, and said so
``--threshold N``             the threshold of the model's own solver (or of ``--solver``),
                              ``dataclasses.replace``; never another solver
``--training_gradient``       ``training_gradient=``; refused unless the builder takes it
``--backward_solver NAME...`` the backward solver of ``--training_gradient exact`` (default
                              broyden), of the forward threshold less one iterates, tol 1e-4
``--checkpoint FILE``         ``checkpoint=FILE`` if the builder names a ``checkpoint``
                              parameter (it loads the file into its own module before adapting
                              it); otherwise loaded into the built DEQ, renamed by ``--key_map``
============================  ===================================================================

Every refusal is a ValueError naming the option and what the builder accepts, raised before
the builder runs.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonargparse import Namespace

from deq_attacks.checkpoints import KeyMap, load_weights
from deq_attacks.deq import ImplicitGradient, PhantomGradient
from deq_attacks.deq.backward import TrainingGradient
from deq_attacks.deq.contract import DEQModel
from deq_attacks.models.registry import builder_keywords, resolve_builder
from deq_attacks.solvers import Solver, parse_solver, solver_spec
from deq_attacks.training.config import DEFAULT_SOLVER

#: The paper's forward threshold, used for the exact gradient's backward solve (8/7) when
#: neither --threshold nor --solver says otherwise.
DEFAULT_THRESHOLD = 8


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["channels=16", "name=x"]`` -> ``{"channels": 16, "name": "x"}``."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model_arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


@dataclass
class BuiltModel:
    """The model and what the options did to it, for the console and the results."""

    model: DEQModel
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def requested_solver(args: Namespace) -> Solver | None:
    """The solver ``--solver`` (with ``--threshold``) asks for, or None."""
    if args.solver is None:
        return None
    given = {"threshold": args.threshold} if args.threshold is not None else {}
    return parse_solver(args.solver, **given)


def requested_training_gradient(args: Namespace, solver: Solver | None) -> TrainingGradient | None:
    """The training gradient ``--training_gradient`` asks for, or None: phantom (k=5,
    lambda=0.5), or exact with the ``--backward_solver`` of the forward threshold less one
    iterates (tol 1e-4)."""
    if args.training_gradient != "exact" and args.backward_solver is not None:
        raise ValueError(
            f"--backward_solver {args.backward_solver} is the solver of --training_gradient "
            "exact: give that too, or drop it"
        )
    if args.training_gradient is None:
        return None
    if args.training_gradient == "phantom":
        return PhantomGradient(5, 0.5)
    forward = (
        solver.threshold
        if solver is not None
        else (args.threshold if args.threshold is not None else DEFAULT_THRESHOLD)
    )
    backward = args.backward_solver or DEFAULT_SOLVER  # the training's default too
    return ImplicitGradient(parse_solver(backward, threshold=max(1, forward - 1), tol=1e-4))


def _refuse(option: str, keyword: str, model: str, accepted: object) -> ValueError:
    return ValueError(
        f"{option}: the builder of --model {model} takes no {keyword}= (it accepts: "
        f"{accepted}); add the parameter to the builder or drop the option"
    )


def _solver_record(solver: Solver) -> dict[str, Any]:
    try:
        spec: dict[str, Any] | None = solver_spec(solver)
    except ValueError:  # a user's own, unregistered solver: its repr is what can be recorded
        spec = None
    return {"solver": repr(solver), "solver_spec": spec}


def build_model(args: Namespace) -> BuiltModel:
    """The DEQ that the model options describe, checked and loaded (see the module docs)."""
    builder = resolve_builder(args.model)
    keywords = builder_keywords(builder)
    kwargs = parse_model_args(args.model_arg)
    for key in kwargs:
        if not keywords.accepts(key):
            raise _refuse(f"--model_arg {key}=...", key, args.model, keywords)
    solver = requested_solver(args)
    gradient = requested_training_gradient(args, solver)
    passed: dict[str, tuple[str, Any]] = {}
    if solver is not None and keywords.accepts("solver"):
        passed["solver"] = ("--solver", solver)
    if gradient is not None:
        if not keywords.accepts("training_gradient"):
            raise _refuse("--training_gradient", "training_gradient", args.model, keywords)
        passed["training_gradient"] = ("--training_gradient", gradient)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    if args.key_map and args.checkpoint is None:
        raise ValueError("--key_map renames the keys of --checkpoint: give --checkpoint too")
    key_map = KeyMap.parse(args.key_map) if args.key_map else None
    builder_loads = args.checkpoint is not None and keywords.accepts("checkpoint", explicit=True)
    if builder_loads:
        if key_map is not None:
            raise ValueError(
                f"--key_map: the builder of --model {args.model} takes checkpoint= and loads "
                "the file itself; rename its keys there (deq_attacks.checkpoints.load_weights("
                "..., key_map=...)) or drop the builder's checkpoint parameter"
            )
        passed["checkpoint"] = ("--checkpoint", args.checkpoint)
    for keyword, (option, value) in passed.items():
        if keyword in kwargs:
            raise ValueError(f"{keyword} is given twice: by {option} and by --model_arg")
        kwargs[keyword] = value
    try:
        model = builder(**kwargs)
    except Exception as error:  # the user's builder may fail in any way: name it, no traceback
        raise ValueError(
            f"--model {args.model}: the builder raised {type(error).__name__}: {error}"
        ) from None
    if not isinstance(model, DEQModel):
        raise TypeError(
            f"--model {args.model} built a {type(model).__name__}, not a deq_attacks DEQ "
            "(DEQModel): adapt it with deq_attacks.adapters (from_f, from_torchdeq)"
        )
    built = BuiltModel(model)
    _apply_solver(built, args, solver, "solver" in passed)
    if gradient is not None and model.training_gradient != gradient:
        raise ValueError(
            f"--training_gradient: the builder of --model {args.model} took "
            f"training_gradient={gradient!r} but its model trains with "
            f"{model.training_gradient!r}"
        )
    built.record["training_gradient"] = repr(model.training_gradient)
    if args.checkpoint is None:
        built.record["checkpoint"] = None
    elif builder_loads:
        built.notes.append(f"checkpoint {args.checkpoint}: loaded by the builder (checkpoint=)")
        built.record["checkpoint"] = {"path": str(args.checkpoint), "loaded_by": "builder"}
    else:
        loaded = load_weights(model, args.checkpoint, key_map=key_map)
        built.notes.append(f"checkpoint {loaded.describe()}")
        built.record["checkpoint"] = {
            "path": str(args.checkpoint),
            "loaded_by": "deq-attacks",
            "read": loaded.describe(),
            "key_map": str(key_map) if key_map is not None else None,
        }
    return built


def _apply_solver(built: BuiltModel, args: Namespace, solver: Solver | None, passed: bool) -> None:
    """Check the solver the builder got, or set ``--solver``/``--threshold`` on the model."""
    model = built.model
    own = model.solver
    if solver is not None and passed:
        if own != solver:
            raise ValueError(
                f"--solver: the builder of --model {args.model} took solver={solver!r} but "
                f"its model solves with {own!r}"
            )
        choice = f"--solver {args.solver}, passed to the builder"
    elif solver is not None:
        model.readout.check(solver.threshold)
        model.solver = solver
        choice = (
            f"--solver {args.solver}; the builder takes no solver=, so it replaced the built "
            f"model's {own!r}"
        )
    elif args.threshold is not None:
        model.readout.check(args.threshold)
        model.solver = dataclasses.replace(own, threshold=args.threshold)
        choice = f"the model's own solver with --threshold {args.threshold}"
    else:
        choice = "the model's own solver"
    built.notes.append(f"solver {model.solver!r}: {choice}")
    built.record.update(_solver_record(model.solver), solver_choice=choice)
