"""``TrainConfig``: every setting of one PGD-AT run (Sec. 6, Appendix A, Table 7), in five
sections that each validate themselves: ``model`` (a ``ModelSpec``, as ``evaluate`` takes it),
``threat`` (the adversary), ``data``, ``optimiser`` and ``execution``.

The defaults are the paper's exact-trained DEQ-Large recipe; `presets.PRESETS` names the others.
The command line derives its options from these classes (``--optimiser.epochs``; the docstring
under each field is its help) and the run folder records the config as ``config.json``. The
module imports no torch: validation imports the model registry, the solver registry and
``Acceleration`` when it runs (and no ``from __future__ import annotations``: jsonargparse then
reads the fields' types as objects, without running the ``TYPE_CHECKING`` imports).
"""

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deq_attacks.model_spec import BASELINE_MODELS, DEFAULT_SOLVER, Gradient, ModelSpec, is_int
from deq_attacks.records import to_jsonable

if TYPE_CHECKING:
    from deq_attacks.acceleration import Acceleration

__all__ = [
    "BASELINE_MODELS",
    "DEFAULT_SOLVER",
    "MEMORY_DATA",
    "RUN_ONLY_KEYS",
    "TRAINERS",
    "DataSettings",
    "Device",
    "ExecutionSettings",
    "Gradient",
    "OptimiserSettings",
    "ThreatSettings",
    "TrainConfig",
]

#: ``data.source`` value for arrays handed to ``run_training(config, run_dir, data=...)``.
MEMORY_DATA = "memory"
#: Who drives PGD-AT (``execution.trainer``): this package's loop, or ART's
#: ``AdversarialTrainerMadryPGD`` over a ``DEQEstimator`` (``training/art_trainer.py``).
TRAINERS = ("deq_attacks", "art_madry")
#: The dev evaluation's batch when ``eval_batch_size`` is None, per device.
DEFAULT_EVAL_BATCH = {"cpu": 200, "cuda": 500}

#: Settings that change how a run executes but not what it computes: a resumed run may differ
#: in these (threads, loader workers, where CIFAR-10 lives, whether it may be downloaded, plots).
RUN_ONLY_KEYS = frozenset(
    {"execution.threads", "execution.num_workers", "data.data_root", "data.download",
     "execution.plots"}
)  # fmt: skip


class Device(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class _Checks:
    """Collects the problems of one section's fields, each as one message."""

    def __init__(self, section: object) -> None:
        self.section, self.out = section, []  # type: ignore[var-annotated]

    def ints(self, names: tuple[str, ...], low: int, optional: bool = False) -> None:
        """Each field an int >= ``low`` (``optional``: or None)."""
        for name in names:
            value = getattr(self.section, name)
            if optional and value is None:
                continue
            if not is_int(value) or value < low:
                what = f"None or an int >= {low}" if optional else f"an int >= {low}"
                self.out.append(f"{name} must be {what}, got {value!r}")

    def number(self, name: str, ok: Callable[[float], bool], what: str) -> None:
        """The field a number for which ``ok`` holds (``what`` says which)."""
        value = getattr(self.section, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            self.out.append(f"{name} must be {what}, got {value!r}")

    def bools(self, names: tuple[str, ...]) -> None:
        for name in names:
            if not isinstance(getattr(self.section, name), bool):
                self.out.append(
                    f"{name} must be true or false, got {getattr(self.section, name)!r}"
                )

    def raise_any(self, section: str) -> None:
        if self.out:
            raise ValueError(f"invalid {section} settings: " + "; ".join(self.out))


@dataclass(frozen=True)
class ThreatSettings:
    """The adversary of PGD-AT and of the development PGD."""

    adversarial: bool = True
    """PGD-AT after pretraining."""
    eps: float = 8 / 255
    """Budget in `norm`, inputs in [0, 1]."""
    step: float = 2 / 255
    """PGD step size (its length in `norm`)."""
    steps: int = 10
    """PGD iterations."""
    random_start: bool = True
    """Uniform random start of the training PGD (the dev PGD always has one)."""
    norm: str = "Linf"
    """Threat model of the training and dev PGD: Linf or L2 (ART's PGD with norm inf or 2)."""
    adversary: str = "torch"
    """Who makes the training and dev PGD: torch (`deq_attacks.adversarial.pgd`) or art
    (ART's ProjectedGradientDescent over a DEQEstimator); the same adversaries, torch faster."""

    def __post_init__(self) -> None:
        checks = _Checks(self)
        checks.bools(("adversarial", "random_start"))
        checks.ints(("steps",), 1)
        if self.norm not in ("Linf", "L2"):
            checks.out.append(f"norm must be Linf or L2, got {self.norm!r}")
        if self.adversary not in ("torch", "art"):
            checks.out.append(f"adversary must be torch or art, got {self.adversary!r}")
        top = 1 if self.norm == "Linf" else math.inf
        where = "in (0, 1] under L-inf" if top == 1 else "a finite number > 0"
        for name in ("eps", "step"):
            checks.number(name, lambda v: 0 < v <= top, where)
        checks.raise_any("threat")


@dataclass(frozen=True)
class DataSettings:
    """The training data, its development split (checkpoint choice) and augmentation."""

    source: str = "cifar10"
    """'cifar10' (torchvision), 'digits' (embedded), an arrays file .npz, or 'memory' (the arrays
    passed to run_training(..., data=...)); training uses the part deq_attacks.splits assigns
    to it."""
    data_root: Path = Path("data")
    """torchvision's CIFAR-10 folder."""
    download: bool = False
    """Let torchvision download CIFAR-10."""
    train_limit: int | None = None
    """Use only the first N training images (null: all)."""
    dev_size: int = 1000
    """Development images held out from the training set."""
    crop_padding: int = 4
    """RandomCrop padding of the augmentation (0: no crop)."""
    flip: bool = True
    """Random horizontal flip."""

    def __post_init__(self) -> None:
        checks = _Checks(self)
        checks.ints(("crop_padding",), 0)
        checks.ints(("dev_size",), 1)
        checks.ints(("train_limit",), 1, optional=True)
        checks.bools(("download", "flip"))
        known = ("cifar10", "digits", MEMORY_DATA)
        if not isinstance(self.source, str) or (
            self.source not in known and not self.source.endswith(".npz")
        ):
            checks.out.append(
                "source must be 'cifar10', 'digits', 'memory' or an arrays file ending in .npz: "
                f"{self.source!r}"
            )
        checks.raise_any("data")


@dataclass(frozen=True)
class OptimiserSettings:
    """Adam, its schedule, the clean pretraining and the Jacobian regulariser."""

    epochs: int = 150
    """Epochs in all, pretraining included."""
    batch_size: int = 96
    """Global batch (split across ranks)."""
    lr: float = 1e-3
    """Initial Adam learning rate."""
    lr_min: float = 1e-6
    """End of the per-step cosine decay."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    pretrain_steps: int = 16000
    """Clean optimizer steps first, the DEQ run as an unrolled network."""
    pretrain_depth: int = 8
    """Applications of f in the unrolled pretraining network."""
    jac_weight: float = 0.4
    """Jacobian regularisation weight (0: none)."""
    jac_frequency: float = 0.02
    """Fraction of DEQ-mode training steps that carry it."""
    jac_stop_epoch: int = 90
    """0-based epoch from which it is no longer applied."""
    random_state: bool = False
    """Random-intermediate-state training (Yang et al. 2023): each DEQ-mode step takes its loss
    at z_n instead of z*, n uniform in 1..forward_threshold (one draw per step, seeded by
    (seed, step)), the training gradient starting from z_n; adversaries and the dev
    evaluation keep the full solve."""

    def __post_init__(self) -> None:
        checks = _Checks(self)
        checks.ints(("epochs", "batch_size", "pretrain_depth"), 1)
        checks.ints(("pretrain_steps", "jac_stop_epoch"), 0)
        checks.number("lr", lambda v: v > 0, "> 0")
        lr = self.lr if isinstance(self.lr, (int, float)) else math.nan
        checks.number("lr_min", lambda v: 0 <= v <= lr, f"in [0, lr={self.lr}]")
        checks.number("weight_decay", lambda v: v >= 0, ">= 0")
        checks.number("jac_weight", lambda v: v >= 0, ">= 0")
        checks.number("jac_frequency", lambda v: 0 < v <= 1, "in (0, 1]")
        checks.bools(("random_state",))
        checks.raise_any("optimiser")


@dataclass(frozen=True)
class ExecutionSettings:
    """Where and how the run executes: seed, device, speed-ups, workers, monitoring."""

    seed: int = 0
    """Seed of everything random."""
    device: Device = Device.CUDA
    """CPU or CUDA."""
    bf16: bool = False
    """bfloat16 autocast for forward passes (CUDA only)."""
    tf32: bool = False
    """TensorFloat-32 matmuls and convolutions (CUDA only)."""
    compile: bool = False
    """torch.compile the DEQ's f (a baseline: the whole model), in place."""
    compile_mode: str = "default"
    """torch.compile mode: default, max-autotune-no-cudagraphs, or reduce-overhead and
    max-autotune (these use CUDA graphs: CUDA only)."""
    compile_backend: str = "inductor"
    """torch.compile backend (aot_eager: no code generated)."""
    channels_last: bool = False
    """Channels-last memory format for weights and inputs."""
    threads: int | None = None
    """Torch CPU threads (null: torch's)."""
    num_workers: int = 2
    """DataLoader worker processes."""
    eval_batch_size: int | None = None
    """Batch of the dev evaluation (null: 200 on CPU, 500 on CUDA)."""
    spectral_samples: int = 32
    """Dev images for the spectral radius of J_f at z* (0: skip)."""
    plots: bool = True
    """Redraw training.png after every epoch."""
    trainer: str = "deq_attacks"
    """Who drives PGD-AT: deq_attacks (this package's loop) or art_madry (ART's
    AdversarialTrainerMadryPGD over a DEQEstimator, one fit per epoch, L-inf only; refuses
    pretraining, the Jacobian regulariser, random states, bf16, channels-last and torchrun)."""

    def __post_init__(self) -> None:
        checks = _Checks(self)
        checks.ints(("seed", "num_workers", "spectral_samples"), 0)
        checks.ints(("threads", "eval_batch_size"), 1, optional=True)
        checks.bools(("plots",))
        if self.trainer not in TRAINERS:
            checks.out.append(f"trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")
        if not isinstance(self.device, Device):
            checks.out.append(f"device must be cpu or cuda, got {self.device!r}")
        checks.raise_any("execution")

    def acceleration_problems(self) -> list[str]:
        """The speed-up options that are invalid or that the device cannot serve. They import
        ``deq_attacks.acceleration`` (and so torch): ``TrainConfig`` checks them, so that a
        parser built from the defaults stays free of torch."""
        try:
            acceleration = self.acceleration
        except ValueError as error:
            return [str(error)]
        return acceleration.problems(self.device.value)

    @property
    def acceleration(self) -> "Acceleration":
        """The speed-up options (``deq_attacks.acceleration``)."""
        from deq_attacks.acceleration import Acceleration

        return Acceleration(
            compile=self.compile,
            compile_mode=self.compile_mode,
            compile_backend=self.compile_backend,
            channels_last=self.channels_last,
            tf32=self.tf32,
            bf16=self.bf16,
        )

    @property
    def dev_batch_size(self) -> int:
        """``eval_batch_size``, or the device's default."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return DEFAULT_EVAL_BATCH[self.device.value]


def paper_model() -> ModelSpec:
    """The paper's model: DEQ-Large, exact gradient, Broyden forward/backward 8/7, tol 1e-3
    (built when asked: validating a spec imports the registries, and so torch)."""
    return ModelSpec(
        "deq_large",
        training_gradient=Gradient.EXACT,
        forward_solver=DEFAULT_SOLVER,
        forward_threshold=8,
        backward_solver=DEFAULT_SOLVER,
        backward_threshold=7,
        solver_tol=1e-3,
    )


#: The sections of a TrainConfig, by name.
SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "threat": ThreatSettings,
    "data": DataSettings,
    "optimiser": OptimiserSettings,
    "execution": ExecutionSettings,
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The docstring under each field is its help on the command line."""

    model: ModelSpec = field(default_factory=paper_model)
    """The model (as deq-attacks evaluate takes it); training fills num_classes, in_channels
    and image_size from the data."""
    threat: ThreatSettings = field(default_factory=ThreatSettings)
    """The adversary of PGD-AT and of the development PGD."""
    data: DataSettings = field(default_factory=DataSettings)
    """The training data."""
    optimiser: OptimiserSettings = field(default_factory=OptimiserSettings)
    """Optimiser, schedule, pretraining and regulariser."""
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    """Seed, device, speed-ups and monitoring."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}"
            for name, cls in SECTIONS.items()
            if not isinstance(getattr(self, name), cls)
        ]
        if not problems:
            problems = _cross_problems(self)
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def is_deq(self) -> bool:
        return self.model.is_deq

    def updated(self, **changes: Any) -> "TrainConfig":
        """A copy with fields changed by their own names, whichever section holds them
        (``updated(epochs=3, eps=0.1)``), or whole sections by theirs (``updated(model=...)``)."""
        sections: dict[str, dict[str, Any]] = {}
        direct = {k: v for k, v in changes.items() if k in SECTIONS}
        for key, value in changes.items():
            if key in direct:
                continue
            owner = _owner(key)
            sections.setdefault(owner, {})[key] = value
        for owner, values in sections.items():
            direct[owner] = dataclasses.replace(direct.get(owner, getattr(self, owner)), **values)
        return dataclasses.replace(self, **direct)

    def flat(self) -> dict[str, Any]:
        """Every setting as JSON values under ``section.field`` keys."""
        return {
            f"{section}.{key}": value
            for section, values in to_jsonable(self).items()
            for key, value in values.items()
        }

    def differences(self, other: "TrainConfig") -> list[str]:
        """Settings (outside ``RUN_ONLY_KEYS``) whose values differ, as ``key: self -> other``."""
        mine, theirs = self.flat(), other.flat()
        return [
            f"{key}: {mine[key]!r} -> {theirs[key]!r}"
            for key in mine
            if key not in RUN_ONLY_KEYS and mine[key] != theirs[key]
        ]

    def fingerprint(self) -> str:
        """12 hex digits of the SHA-256 of the settings outside ``RUN_ONLY_KEYS`` (as JSON):
        configs that compute the same run share it (``train_cached`` names run folders by it)."""
        values = {k: v for k, v in self.flat().items() if k not in RUN_ONLY_KEYS}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config that ``deq_attacks.records.to_jsonable`` wrote (unknown keys raise), or
        settings by section as the command line parses them; every section's problems are
        reported at once."""
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            flat = (
                any(_owns(key) for key in unknown)
                or "model" in values
                and not isinstance(values["model"], (dict, ModelSpec))
            )
            hint = (
                " (a flat config.json of a deq_attacks before the sections: start a new run "
                "folder, or nest its keys under their sections)"
                if flat
                else ""
            )
            raise ValueError(
                f"unknown TrainConfig sections {unknown}; known: {list(SECTIONS)}{hint}"
            )
        built: dict[str, Any] = {}
        problems: list[str] = []
        for name, section in SECTIONS.items():
            given = values.get(name)
            if given is None or isinstance(given, section):
                if given is not None:
                    built[name] = given
                continue
            try:
                built[name] = _section(section, dict(given))
            except (ValueError, TypeError) as error:
                problems.append(str(error))
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**built)


def _owns(key: str) -> str | None:
    """The section that has the field ``key``, or None."""
    for name, section in SECTIONS.items():
        if key in {f.name for f in dataclasses.fields(section)}:
            return name
    return None


def _owner(key: str) -> str:
    """The section that has the field ``key``."""
    owner = _owns(key)
    if owner is None:
        raise TypeError(f"TrainConfig has no setting {key!r}")
    return owner


def _section(cls: type, values: dict[str, Any]) -> Any:
    """The section ``cls`` from JSON values (enums and paths converted; unknown keys raise)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    converted = dict(values)
    for key, kind in (("device", Device), ("training_gradient", Gradient)):
        if isinstance(converted.get(key), str):
            converted[key] = kind(converted[key])
    for key in ("data_root", "checkpoint"):
        if isinstance(converted.get(key), str):
            converted[key] = Path(converted[key])
    return cls(**converted)


def _cross_problems(c: TrainConfig) -> list[str]:
    """The problems that span sections (each section has checked its own fields)."""
    model = c.model
    out = model.registry_problems() + c.execution.acceleration_problems()
    if model.training_gradient is None:
        out.append("model.training_gradient must be given for training: exact, phantom or autograd")
    elif model.training_gradient is Gradient.AUTOGRAD:
        if ":" not in model.name and not model.is_baseline:
            out.append(f"{model.name} is a DEQ: use training_gradient exact or phantom")
        if c.optimiser.jac_weight > 0:
            out.append("Jacobian regularisation is DEQ-only: set jac_weight=0 for autograd")
        if c.optimiser.random_state:
            out.append("random_state (the loss at a random z_n) is DEQ-only, not for autograd")
    elif model.forward_solver is None or model.forward_threshold is None:
        out.append("model.forward_solver and model.forward_threshold must be given for training")
    return out + _art_madry_problems(c)


def _art_madry_problems(c: TrainConfig) -> list[str]:
    """The settings that ART's ``AdversarialTrainerMadryPGD`` cannot honour, one message each
    (none unless ``execution.trainer`` is art_madry). Its ``fit`` owns the steps: each batch
    is ART's L-inf PGD then one ``estimator.fit`` in float32 on the batch as given."""
    if c.execution.trainer != "art_madry":
        return []
    refused = (
        (not c.threat.adversarial, "threat.adversarial false", "it trains on PGD examples only"),
        (c.threat.norm != "Linf", "threat.norm L2", "its PGD is L-inf"),
        (c.optimiser.pretrain_steps > 0, f"optimiser.pretrain_steps {c.optimiser.pretrain_steps}",
         "it has no clean pretraining: set 0"),
        (c.optimiser.jac_weight > 0, f"optimiser.jac_weight {c.optimiser.jac_weight}",
         "its fit takes no Jacobian penalty: set 0"),
        (c.optimiser.random_state, "optimiser.random_state", "its fit takes the loss at z*"),
        (c.execution.bf16, "execution.bf16", "its fit runs no autocast"),
        (c.execution.channels_last, "execution.channels_last",
         "its fit passes its own contiguous batches"),
    )  # fmt: skip
    return [
        f"execution.trainer art_madry cannot honour {name} ({why})"
        for bad, name, why in refused
        if bad
    ]
