"""``ModelSpec``: which model to build and how, validated at construction, and ``build_model``,
the one builder behind ``deq-attacks evaluate``, ``deq-attacks train`` (``TrainConfig.model``)
and ``benchmark()``'s callers. The options are the spec's fields, spelled the same everywhere
(``--model.name``, ``--model.forward_threshold``; ``--train.model.*`` in the demo).

``name`` is a registered model or a user's ``package.module:function`` (imported from the
working directory, as ``python -m`` would). The builder is called with keywords only, and a
field reaches it only if its signature takes it (``inspect.signature``; ``**kwargs`` counts):

=====================  =========================================================================
field                  how it reaches the model
=====================  =========================================================================
``args``               ``KEY=VALUE`` each (``--model.args.KEY VALUE``); refused unless the
                       builder takes ``KEY``
(the data)             ``num_classes``, ``in_channels`` and ``image_size`` of the data the model
                       is built for, when the builder names that parameter and ``args`` does not
``forward_solver``     ``solver=`` (with ``forward_threshold`` and ``solver_tol``) if the builder
                       takes it (the built model must then use it); otherwise set on the DEQ
``forward_threshold``  without ``forward_solver``: the threshold of the model's own solver
                       (``dataclasses.replace``); never another solver
``training_gradient``  ``training_gradient=``: phantom (``phantom_k``, ``phantom_lam``) or exact
                       (the implicit gradient); refused unless the builder takes it; autograd: a
                       plain network (the ResNet/WRN baselines), no DEQ
``backward_solver``    the backward solver of the exact gradient (null: broyden), of
                       ``backward_threshold`` iterates (null: the forward threshold less one)
                       and ``solver_tol`` (null: 1e-4)
``checkpoint``         ``checkpoint=FILE`` if the builder names a ``checkpoint`` parameter (it
                       loads the file itself); otherwise loaded into the DEQ, renamed by
                       ``key_map``
=====================  =========================================================================

Every refusal is a ValueError naming the field and what the builder accepts, raised before the
builder runs. The module imports no torch until ``build_model`` runs (``--help`` stays fast;
no ``from __future__ import annotations``: jsonargparse reads the fields' types as objects).
"""

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deq_attacks.registry import canonical

if TYPE_CHECKING:
    from torch import nn

    from deq_attacks.deq.backward import TrainingGradient
    from deq_attacks.deq.contract import DEQModel
    from deq_attacks.solvers import Solver

__all__ = [
    "BASELINE_MODELS",
    "DEFAULT_SOLVER",
    "BuiltModel",
    "Gradient",
    "ModelSpec",
    "build_model",
]

#: The forward and backward solver of the training presets and of the exact gradient's
#: backward solve unless a spec names another (the paper's Broyden).
DEFAULT_SOLVER = "broyden"
#: The paper's forward threshold: the exact gradient's backward solve is one less (8/7) when
#: the spec sets neither threshold.
DEFAULT_THRESHOLD = 8
#: Tolerance of the exact gradient's backward solve when ``solver_tol`` is null.
DEFAULT_BACKWARD_TOL = 1e-4
#: Registered models that are not DEQs: trained with plain autograd, no DEQ-only steps.
BASELINE_MODELS = frozenset({"resnet18", "wrn34_10"})


class Gradient(str, enum.Enum):
    """How the training gradient reaches the parameters (and which gradient PGD-AT attacks
    with: the same one, Appendix A)."""

    EXACT = "exact"  # ImplicitGradient: a backward solve by backward_solver
    PHANTOM = "phantom"  # PhantomGradient(k, lambda): the unrolling-trained DEQ
    AUTOGRAD = "autograd"  # plain backpropagation: the ResNet / WRN baselines


@dataclass(frozen=True)
class ModelSpec:
    """The model: a builder and what reaches it (docs/own_deq.md)."""

    name: str = ""
    """A registered model (`deq-attacks list models`) or your builder, package.module:function
    (imported from the working directory and called, as Hydra's _target_: a config file naming
    one is trusted like a script); it returns a deq_attacks DEQ (DEQModel)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keywords for the builder (--model.args.KEY VALUE, or a dict), e.g. channels, dropout,
    hidden; num_classes, in_channels and image_size default to the data's."""
    training_gradient: Gradient | None = None
    """The model's training gradient: PHANTOM (phantom_k, phantom_lam), EXACT (implicit, a
    backward solve) or AUTOGRAD (a plain network: the ResNet/WRN baselines); null: the
    builder's own. It fixes the ready-made attack."""
    forward_solver: str | None = None
    """Forward solver: a registered name with optional settings (`deq-attacks list solvers`),
    e.g. anderson or anderson:memory=5; its threshold and tol are forward_threshold and
    solver_tol (null: the model's own solver)."""
    forward_threshold: int | None = None
    """Forward iterates (of forward_solver, else of the model's own solver)."""
    backward_solver: str | None = None
    """Backward solver of the EXACT gradient, in the same form (null: broyden)."""
    backward_threshold: int | None = None
    """Backward iterates of the EXACT gradient (null: forward_threshold - 1; unused by the
    others)."""
    solver_tol: float | None = None
    """Relative-residual tolerance of both solvers (null: the forward solver's own; 1e-4 for
    the backward solve)."""
    phantom_k: int = 5
    """Unrolling steps k of the PHANTOM gradient."""
    phantom_lam: float = 0.5
    """Damping lambda of the PHANTOM gradient."""
    checkpoint: Path | None = None
    """Weights: .safetensors or a torch.save state dict (.pt/.pth/.bin/.pth.tar; read with
    weights_only=True, containers such as 'state_dict' opened)."""
    key_map: list[str] = field(default_factory=list)
    """Checkpoint key prefixes renamed before loading, OLD=NEW each (e.g. encoder.=injection.),
    applied in order."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid model spec: " + "; ".join(problems))

    @property
    def is_deq(self) -> bool:
        """Whether the spec builds a DEQ (every training gradient but AUTOGRAD)."""
        return self.training_gradient is not Gradient.AUTOGRAD

    def problems(self) -> list[str]:
        """Every invalid field, each as one message (``__post_init__`` raises them at once);
        the fields the registries judge are ``registry_problems``."""
        out = _value_problems(self)
        if out:
            return out
        if self.training_gradient is Gradient.AUTOGRAD:
            for name in ("forward_solver", "backward_solver"):
                if getattr(self, name) not in (None, DEFAULT_SOLVER):
                    out.append(f"{name} is for DEQs: {self.name} with autograd solves nothing")
        elif self.is_baseline and self.training_gradient is not None:
            out.append(f"{self.name} is not a DEQ: use training_gradient autograd")
        if self.training_gradient is not Gradient.EXACT and self.backward_solver not in (
            None,
            DEFAULT_SOLVER,
        ):
            out.append("backward_solver is the exact gradient's: give training_gradient exact")
        if self.key_map and self.checkpoint is None:
            out.append("key_map renames the keys of checkpoint: give checkpoint too")
        return out

    @property
    def is_baseline(self) -> bool:
        """Whether ``name`` is a registered model that is not a DEQ (``BASELINE_MODELS``),
        spelled as the registry reads names (``-`` as ``_``)."""
        try:
            return canonical(self.name) in BASELINE_MODELS
        except (TypeError, ValueError):  # an entry point 'module:function', or no text
            return False

    def registry_problems(self) -> list[str]:
        """The problems the model and solver registries find: an unknown model name, a solver
        text that does not build with the spec's threshold and tol. They import torch, so
        construction leaves them to the spec's users (``TrainConfig``, ``build_model``): a
        parser built from the spec's defaults stays free of torch."""
        from deq_attacks.models.registry import MODELS, list_models

        out: list[str] = []
        if ":" not in self.name and self.name not in MODELS:
            out.append(
                f"unknown model {self.name!r}: registered are {', '.join(list_models())}, or "
                "give a 'module:function' entry point"
            )
        for name in ("forward_solver", "backward_solver"):
            try:
                self._solver(name)
            except (ValueError, TypeError) as error:
                out.append(f"{name}: {error}")
        return out

    def _solver(self, name: str) -> "Solver | None":
        from deq_attacks.solvers import parse_solver

        spec = getattr(self, name)
        if spec is None:
            return None
        threshold = self.forward_threshold if name == "forward_solver" else None
        fixed = {"threshold": threshold, "tol": self.solver_tol}
        return parse_solver(spec, **{k: v for k, v in fixed.items() if v is not None})

    def forward(self) -> "Solver | None":
        """The forward solver ``forward_solver`` names (with ``forward_threshold`` and
        ``solver_tol``), or None: the model's own."""
        return self._solver("forward_solver")

    def gradient(self) -> "TrainingGradient | None":
        """The training gradient the spec asks for, or None (the builder's own, or autograd)."""
        from deq_attacks.deq import ImplicitGradient, PhantomGradient
        from deq_attacks.solvers import parse_solver

        if self.training_gradient is Gradient.PHANTOM:
            return PhantomGradient(self.phantom_k, self.phantom_lam)
        if self.training_gradient is not Gradient.EXACT:
            return None
        forward = self.forward()
        threshold = self.backward_threshold
        if threshold is None:
            own = forward.threshold if forward is not None else self.forward_threshold
            threshold = max(1, (own if own is not None else DEFAULT_THRESHOLD) - 1)
        tol = self.solver_tol if self.solver_tol is not None else DEFAULT_BACKWARD_TOL
        solver = parse_solver(self.backward_solver or DEFAULT_SOLVER, threshold=threshold, tol=tol)
        return ImplicitGradient(solver)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_problems(s: ModelSpec) -> list[str]:
    """The fields that are invalid on their own."""
    out: list[str] = []
    if not isinstance(s.name, str) or not s.name:
        out.append(
            f"name must be given (--model.name): a registered model (deq-attacks list models) "
            f"or 'module:function', got {s.name!r}"
        )
    if not isinstance(s.args, dict) or not all(isinstance(k, str) and k for k in s.args):
        out.append(f"args must be a dict of keyword names to values, got {s.args!r}")
    if s.training_gradient is not None and not isinstance(s.training_gradient, Gradient):
        out.append(
            f"training_gradient must be one of {[g.value for g in Gradient]} or null, got "
            f"{s.training_gradient!r}"
        )
    for name in ("forward_threshold", "backward_threshold"):
        value = getattr(s, name)
        if value is not None and (not is_int(value) or value < 1):
            out.append(f"{name} must be null or an int >= 1, got {value!r}")
    for name in ("forward_solver", "backward_solver"):
        value = getattr(s, name)
        if value is not None and not isinstance(value, str):
            out.append(f"{name} must be text (a solver name, settings optional), got {value!r}")
    tol = s.solver_tol
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf
    ):
        out.append(f"solver_tol must be null or a finite number >= 0, got {tol!r}")
    if not is_int(s.phantom_k) or s.phantom_k < 1:
        out.append(f"phantom_k must be an int >= 1, got {s.phantom_k!r}")
    lam = s.phantom_lam
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
        out.append(f"phantom_lam must be in (0, 1], got {lam!r}")
    if s.checkpoint is not None and not isinstance(s.checkpoint, Path):
        out.append(f"checkpoint must be a path or null, got {s.checkpoint!r}")
    if not isinstance(s.key_map, list) or not all(isinstance(k, str) for k in s.key_map):
        out.append(f"key_map must be a list of OLD=NEW texts, got {s.key_map!r}")
    return out


@dataclass
class BuiltModel:
    """The model and what the spec did to it, for the console and the results."""

    model: "nn.Module"
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def _refuse(option: str, keyword: str, model: str, accepted: object) -> ValueError:
    return ValueError(
        f"{option}: the builder of model {model} takes no {keyword}= (it accepts: "
        f"{accepted}); add the parameter to the builder or drop the option"
    )


def build_model(
    spec: ModelSpec,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> BuiltModel:
    """The model ``spec`` describes, for images ``image_shape`` (C, H, W) and ``num_classes``
    when given, checked and loaded (see the module docs)."""
    from deq_attacks.checkpoints import KeyMap, load_weights
    from deq_attacks.deq.contract import DEQModel
    from deq_attacks.models.registry import builder_keywords, resolve_builder

    problems = spec.registry_problems()
    if problems:
        raise ValueError("invalid model spec: " + "; ".join(problems))
    builder = resolve_builder(spec.name)
    keywords = builder_keywords(builder)
    kwargs = dict(spec.args)
    for key in kwargs:
        if not keywords.accepts(key):
            raise _refuse(f"model.args.{key}", key, spec.name, keywords)
    data: dict[str, Any] = {"num_classes": num_classes}
    if image_shape is not None:
        data["in_channels"] = image_shape[0]
        if image_shape[1] == image_shape[2]:
            data["image_size"] = image_shape[1]
    for key, value in data.items():
        if value is not None and key not in kwargs and keywords.accepts(key, explicit=True):
            kwargs[key] = value
    solver, gradient = spec.forward(), spec.gradient()
    passed: dict[str, tuple[str, Any]] = {}
    if solver is not None and keywords.accepts("solver"):
        passed["solver"] = ("forward_solver", solver)
    if gradient is not None:
        if not keywords.accepts("training_gradient"):
            raise _refuse("training_gradient", "training_gradient", spec.name, keywords)
        passed["training_gradient"] = ("training_gradient", gradient)
    if spec.checkpoint is not None and not spec.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {spec.checkpoint}: no such file")
    key_map = KeyMap.parse(spec.key_map) if spec.key_map else None
    builder_loads = spec.checkpoint is not None and keywords.accepts("checkpoint", explicit=True)
    if builder_loads:
        if key_map is not None:
            raise ValueError(
                f"key_map: the builder of model {spec.name} takes checkpoint= and loads the "
                "file itself; rename its keys there (deq_attacks.checkpoints.load_weights(..., "
                "key_map=...)) or drop the builder's checkpoint parameter"
            )
        passed["checkpoint"] = ("checkpoint", spec.checkpoint)
    for keyword, (option, value) in passed.items():
        if keyword in spec.args:
            raise ValueError(f"{keyword} is given twice: by {option} and by args")
        kwargs[keyword] = value
    try:
        model = builder(**kwargs)
    except Exception as error:  # the user's builder may fail in any way: name it, no traceback
        raise ValueError(
            f"model {spec.name}: the builder raised {type(error).__name__}: {error}"
        ) from None
    if not spec.is_deq:
        if isinstance(model, DEQModel):
            raise TypeError(f"{spec.name} is a DEQ: use training_gradient exact or phantom")
        return BuiltModel(model, record={"training_gradient": "autograd"})
    if not isinstance(model, DEQModel):
        raise TypeError(
            f"model {spec.name} built a {type(model).__name__}, not a deq_attacks DEQ "
            "(DEQModel): adapt it with deq_attacks.adapters (from_f, from_torchdeq), or use "
            "training_gradient autograd for a plain network"
        )
    built = BuiltModel(model)
    _apply_solver(built, model, spec, solver, "solver" in passed)
    if gradient is not None and model.training_gradient != gradient:
        raise ValueError(
            f"training_gradient: the builder of model {spec.name} took "
            f"training_gradient={gradient!r} but its model trains with "
            f"{model.training_gradient!r}"
        )
    built.record["training_gradient"] = repr(model.training_gradient)
    if spec.checkpoint is None:
        built.record["checkpoint"] = None
    elif builder_loads:
        built.notes.append(f"checkpoint {spec.checkpoint}: loaded by the builder (checkpoint=)")
        built.record["checkpoint"] = {"path": str(spec.checkpoint), "loaded_by": "builder"}
    else:
        loaded = load_weights(model, spec.checkpoint, key_map=key_map)
        built.notes.append(f"checkpoint {loaded.describe()}")
        built.record["checkpoint"] = {
            "path": str(spec.checkpoint),
            "loaded_by": "deq-attacks",
            "read": loaded.describe(),
            "key_map": str(key_map) if key_map is not None else None,
        }
    return built


def _apply_solver(
    built: BuiltModel, model: "DEQModel", spec: ModelSpec, solver: "Solver | None", passed: bool
) -> None:
    """Check the solver the builder got, or set ``forward_solver`` / ``forward_threshold``
    on the model."""
    from deq_attacks.solvers import solver_spec

    own = model.solver
    if solver is not None and passed:
        if own != solver:
            raise ValueError(
                f"forward_solver: the builder of model {spec.name} took solver={solver!r} but "
                f"its model solves with {own!r}"
            )
        choice = f"forward_solver {spec.forward_solver}, passed to the builder"
    elif solver is not None:
        model.readout.check(solver.threshold)
        model.solver = solver
        choice = (
            f"forward_solver {spec.forward_solver}; the builder takes no solver=, so it "
            f"replaced the built model's {own!r}"
        )
    elif spec.forward_threshold is not None or spec.solver_tol is not None:
        threshold = own.threshold if spec.forward_threshold is None else spec.forward_threshold
        tol = own.tol if spec.solver_tol is None else spec.solver_tol
        model.readout.check(threshold)
        model.solver = dataclasses.replace(own, threshold=threshold, tol=tol)
        choice = f"the model's own solver with forward_threshold {threshold}, solver_tol {tol}"
    else:
        choice = "the model's own solver"
    built.notes.append(f"solver {model.solver!r}: {choice}")
    try:
        recorded: dict[str, Any] | None = solver_spec(model.solver)
    except ValueError:  # a user's own, unregistered solver: its repr is what can be recorded
        recorded = None
    built.record.update(solver=repr(model.solver), solver_spec=recorded, solver_choice=choice)
