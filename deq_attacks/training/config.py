"""``TrainConfig``: every setting of one PGD-AT run (Sec. 6, Appendix A, Table 7), validated.

The defaults are the paper's exact-trained DEQ-Large recipe; `presets.PRESETS` names the others.
Every field is a scalar, so the command line derives its options from this class (the docstring
under each field is its help) and the run folder records it as ``config.json``. The module
imports no torch: validation imports the model registry and ``Acceleration`` when it runs (and
no ``from __future__ import annotations``: jsonargparse then reads the fields' types as objects,
without running the ``TYPE_CHECKING`` imports).
"""

import dataclasses
import enum
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deq_attacks.records import to_jsonable

if TYPE_CHECKING:
    from deq_attacks.acceleration import Acceleration

#: Registered models that are not DEQs: trained with plain autograd, no DEQ-only steps.
BASELINE_MODELS = frozenset({"resnet18", "wrn34_10"})
#: Models with a width setting: channels of the small conv DEQ, base width of ResNet-18, widen
#: factor of WRN-34.
_WIDTH_MODELS = frozenset({"small_conv_deq", "resnet18", "wrn34_10"})

#: The forward and backward solver unless a config names another (the paper's Broyden).
DEFAULT_SOLVER = "broyden"

#: Fields added after run folders were cached under ``TrainConfig.fingerprint``, with the
#: default that leaves them out of it.
LATER_FIELDS: dict[str, Any] = {
    "forward_solver": DEFAULT_SOLVER,
    "backward_solver": DEFAULT_SOLVER,
    "norm": "Linf",
    "random_state": False,
    "adversary": "torch",  # reproduces the ART PGD that trained the earlier runs
}

#: ``data`` value for arrays handed to ``run_training(config, run_dir, data=...)``.
MEMORY_DATA = "memory"
#: The dev evaluation's batch when ``eval_batch_size`` is None, per device.
DEFAULT_EVAL_BATCH = {"cpu": 200, "cuda": 500}

#: Settings that change how a run executes but not what it computes: a resumed run may differ
#: in these (threads, loader workers, where CIFAR-10 lives, whether it may be downloaded, plots).
RUN_ONLY_KEYS = frozenset({"threads", "num_workers", "data_root", "download", "plots"})


class Gradient(str, enum.Enum):
    """How the training gradient reaches the parameters (and which gradient PGD-AT attacks
    with: the same one, Appendix A)."""

    EXACT = "exact"  # ImplicitGradient: a backward solve by backward_solver
    PHANTOM = "phantom"  # PhantomGradient(k, lambda): the unrolling-trained DEQ
    AUTOGRAD = "autograd"  # plain backpropagation: the ResNet / WRN baselines


class Device(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The docstring under each field is its help on the command line."""

    # --- model ----------------------------------------------------------------------------
    model: str = "deq_large"
    """Registered model (deq_large, deq_xl, small_conv_deq, resnet18, wrn34_10; `deq-attacks
    list models`) or a 'module:function' entry point, imported and called (as Hydra's
    _target_: a config file naming one is to be trusted like a script)."""
    width: int | None = None
    """Channels of small_conv_deq, base width of resnet18, widen factor of wrn34_10 (null: the
    model's default)."""
    dropout: float | None = None
    """Variational dropout in f of small_conv_deq (MDEQs: built in, 0.22)."""
    gradient: Gradient = Gradient.EXACT
    """Training gradient: EXACT (implicit, a backward solve), PHANTOM (unrolling, k and
lambda) or AUTOGRAD (the ResNet/WRN baselines)."""
    forward_solver: str = DEFAULT_SOLVER
    """Forward solver: a registered name (`deq-attacks list solvers`) with optional settings,
    as evaluate's --solver takes it (e.g. anderson or anderson:memory=5); its threshold and tol
    are forward_threshold and solver_tol."""
    backward_solver: str = DEFAULT_SOLVER
    """Backward solver of the exact gradient, in the same form; its threshold and tol are
    backward_threshold and solver_tol."""
    forward_threshold: int = 8
    """Forward solver iterates."""
    backward_threshold: int = 7
    """Backward solver iterates of the exact gradient."""
    solver_tol: float = 1e-3
    """Relative-residual tolerance of both solvers."""
    phantom_k: int = 5
    """Unrolling steps k of the phantom gradient."""
    phantom_lam: float = 0.5
    """Damping lambda of the phantom gradient."""
    # --- data -----------------------------------------------------------------------------
    data: str = "cifar10"
    """'cifar10' (torchvision), 'digits' (embedded), an arrays file .npz, or 'memory' (the arrays
    passed to run_training(..., data=...))."""
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
    # --- optimisation ---------------------------------------------------------------------
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
    # --- adversary (PGD-AT and the development PGD) ---------------------------------------
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
    # --- monitoring -----------------------------------------------------------------------
    eval_batch_size: int | None = None
    """Batch of the dev evaluation (null: 200 on CPU, 500 on CUDA)."""
    spectral_samples: int = 32
    """Dev images for the spectral radius of J_f at z* (0: skip)."""
    plots: bool = True
    """Redraw training.png after every epoch."""
    # --- execution ------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def is_deq(self) -> bool:
        return self.gradient is not Gradient.AUTOGRAD

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

    def differences(self, other: "TrainConfig") -> list[str]:
        """Keys (outside ``RUN_ONLY_KEYS``) whose values differ, as ``key: self -> other``."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in RUN_ONLY_KEYS and getattr(self, f.name) != getattr(other, f.name)
        ]

    def fingerprint(self) -> str:
        """12 hex digits of the SHA-256 of the settings outside ``RUN_ONLY_KEYS`` (as JSON):
        configs that compute the same run share it (``train_cached`` names run folders by it).
        Fields added after runs were cached (``LATER_FIELDS``) are left out at their default,
        so that those runs keep their fingerprint."""
        values = {
            k: v
            for k, v in to_jsonable(self).items()
            if k not in RUN_ONLY_KEYS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
        }
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config that ``deq_attacks.records.to_jsonable`` wrote (unknown keys raise)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(known)}")
        converted = dict(values)
        converted["gradient"] = Gradient(values.get("gradient", Gradient.EXACT.value))
        converted["device"] = Device(values.get("device", Device.CUDA.value))
        if "data_root" in values:
            converted["data_root"] = Path(values["data_root"])
        return cls(**converted)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problems(c: TrainConfig) -> list[str]:
    """Every invalid setting of ``c``, each as one message."""
    from deq_attacks.models.registry import list_models

    out: list[str] = []
    positive = (
        "forward_threshold",
        "backward_threshold",
        "phantom_k",
        "epochs",
        "batch_size",
        "pretrain_depth",
        "steps",
    )
    for name in positive:
        if not _is_int(getattr(c, name)) or getattr(c, name) < 1:
            out.append(f"{name} must be an int >= 1, got {getattr(c, name)!r}")
    for name in ("pretrain_steps", "jac_stop_epoch", "crop_padding", "spectral_samples", "seed"):
        if not _is_int(getattr(c, name)) or getattr(c, name) < 0:
            out.append(f"{name} must be an int >= 0, got {getattr(c, name)!r}")
    if not _is_int(c.num_workers) or c.num_workers < 0:
        out.append(f"num_workers must be an int >= 0, got {c.num_workers!r}")
    if not _is_int(c.dev_size) or c.dev_size < 1:
        out.append(f"dev_size must be an int >= 1 (checkpoints are chosen on it), got {c.dev_size}")
    for name in ("train_limit", "threads", "width", "eval_batch_size"):
        value = getattr(c, name)
        if value is not None and (not _is_int(value) or value < 1):
            out.append(f"{name} must be None or an int >= 1, got {value!r}")

    def finite(name: str) -> float:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out.append(f"{name} must be a number, got {value!r}")
            return math.nan
        return float(value)

    if not finite("lr") > 0:
        out.append(f"lr must be > 0, got {c.lr!r}")
    if not 0 <= finite("lr_min") <= c.lr:
        out.append(f"lr_min must be in [0, lr={c.lr}], got {c.lr_min!r}")
    if not finite("weight_decay") >= 0:
        out.append(f"weight_decay must be >= 0, got {c.weight_decay!r}")
    if not 0 <= finite("solver_tol") < math.inf:
        out.append(f"solver_tol must be a finite number >= 0, got {c.solver_tol!r}")
    if not 0 < finite("phantom_lam") <= 1:
        out.append(f"phantom_lam must be in (0, 1], got {c.phantom_lam!r}")
    if not finite("jac_weight") >= 0:
        out.append(f"jac_weight must be >= 0, got {c.jac_weight!r}")
    if not 0 < finite("jac_frequency") <= 1:
        out.append(f"jac_frequency must be in (0, 1], got {c.jac_frequency!r}")
    if c.norm not in ("Linf", "L2"):
        out.append(f"norm must be Linf or L2, got {c.norm!r}")
    if c.adversary not in ("torch", "art"):
        out.append(f"adversary must be torch or art, got {c.adversary!r}")
    top = 1 if c.norm == "Linf" else math.inf
    for name in ("eps", "step"):
        if not 0 < finite(name) <= top:
            where = "in (0, 1] under L-inf" if top == 1 else "a finite number > 0"
            out.append(f"{name} must be {where}, got {getattr(c, name)!r}")
    if c.dropout is not None and not 0 <= finite("dropout") < 1:
        out.append(f"dropout must be in [0, 1), got {c.dropout!r}")
    if not isinstance(c.gradient, Gradient):
        out.append(
            f"gradient must be a Gradient ({[g.value for g in Gradient]}), got {c.gradient!r}"
        )
    if not isinstance(c.device, Device):
        out.append(f"device must be cpu or cuda, got {c.device!r}")
    if not c.model or (":" not in c.model and c.model not in list_models()):
        out.append(
            f"unknown model {c.model!r}: registered are {', '.join(list_models())}, or give a "
            "'module:function' entry point"
        )
    if not isinstance(c.random_state, bool):
        out.append(f"random_state must be a bool, got {c.random_state!r}")
    elif c.random_state and c.gradient is Gradient.AUTOGRAD:
        out.append("random_state (the loss at a random z_n) is DEQ-only, not for gradient=autograd")
    if c.model in BASELINE_MODELS and c.gradient is not Gradient.AUTOGRAD:
        out.append(f"{c.model} is not a DEQ: use gradient=autograd")
    if c.gradient is Gradient.AUTOGRAD and c.model not in BASELINE_MODELS and ":" not in c.model:
        out.append(f"{c.model} is a DEQ: use gradient=exact or phantom, not autograd")
    if c.gradient is Gradient.AUTOGRAD and c.jac_weight > 0:
        out.append("Jacobian regularisation is DEQ-only: set jac_weight=0 for gradient=autograd")
    if c.width is not None and c.model not in _WIDTH_MODELS:
        out.append(f"width applies to {sorted(_WIDTH_MODELS)} only, not {c.model}")
    if c.dropout is not None and c.model != "small_conv_deq":
        out.append(f"dropout is a setting of small_conv_deq only (MDEQs fix 0.22), not {c.model}")
    out.extend(_solver_problems(c))
    try:
        acceleration = c.acceleration
    except ValueError as error:
        out.append(str(error))
    else:
        if isinstance(c.device, Device):
            out.extend(acceleration.problems(c.device.value))
    known_data = ("cifar10", "digits", MEMORY_DATA)
    if not isinstance(c.data, str) or (c.data not in known_data and not c.data.endswith(".npz")):
        out.append(
            f"data must be 'cifar10', 'digits', 'memory' or an arrays file ending in .npz: "
            f"{c.data!r}"
        )
    return out


def _solver_problems(c: TrainConfig) -> list[str]:
    """The problems of ``forward_solver`` and ``backward_solver``: each must build, from the
    registry, with its threshold and ``solver_tol`` (those that are valid themselves), and
    only where it is used."""
    from deq_attacks.solvers.registry import parse_solver

    out: list[str] = []
    fields = (("forward_solver", c.forward_threshold), ("backward_solver", c.backward_threshold))
    for name, threshold in fields:
        spec = getattr(c, name)
        if not isinstance(spec, str):
            out.append(f"{name} must be text (a solver name, settings optional), got {spec!r}")
            continue
        fixed: dict[str, Any] = {}
        if _is_int(threshold) and threshold >= 1:
            fixed["threshold"] = threshold
        tol = c.solver_tol
        if not isinstance(tol, bool) and isinstance(tol, (int, float)) and 0 <= tol < math.inf:
            fixed["tol"] = tol
        try:
            parse_solver(spec, **fixed)
        except (ValueError, TypeError) as error:
            out.append(f"{name}: {error}")
    if c.gradient is Gradient.AUTOGRAD and c.forward_solver != DEFAULT_SOLVER:
        out.append(f"forward_solver is for DEQs: {c.model} with gradient=autograd solves nothing")
    if c.gradient is not Gradient.EXACT and c.backward_solver != DEFAULT_SOLVER:
        out.append("backward_solver is the exact gradient's: use it with gradient=exact")
    return out
