"""Checkpoints of the official MDEQ (locuslab/deq, ``MDEQ-Vision/lib/models/mdeq.py`` and
``mdeq_core.py``) and of the paper's code (minicheshire/DEQ-White-Box-Robustness, the same
model files) loaded into ``deq_large`` / ``deq_xl``.

Their ``MDEQClsNet`` names its parts ``downsample`` + ``stage0`` (our injection),
``fullstage`` (our f: ``branches``, ``fuse_layers``, ``post_fuse_layers``) and
``incre_modules`` + ``downsamp_modules`` + ``final_layer`` + ``classifier`` (our head). Their
weight normalisation keeps ``weight_g`` / ``weight_v``, which are torch's parametrization
``original0`` / ``original1``. ``convert_mdeq_state_dict`` maps every key, in the style of
timm's ``pretrained_filter_fn``; ``load_mdeq_checkpoint`` reads a ``.pth`` file through
``deq_attacks.checkpoints`` (``torch.load(weights_only=True)``, the ``state_dict`` entry of a
training checkpoint, DataParallel's ``module.`` prefix) and loads it only if every key maps and
every shape fits.
Supported: one residual block per branch, ``DOWNSAMPLE_TIMES`` <= 2 and the CIFAR settings
of ``MDEQ_LARGE`` / ``MDEQ_XL`` (block and fusion GroupNorms affine, post-fusion GroupNorm
not); anything else is refused with the keys that do not fit.

torchdeq's zoo MDEQ (locuslab/torchdeq ``deq-zoo/mdeq/mdeq_cifar``) has the same parts under
other names: its stage is ``full_stage.``, torchdeq's ``apply_norm`` weight-normalises every
convolution of the stage (``weight_g``/``weight_v``, the fusion convolutions too) and its
post-fusion GroupNorm is affine. ``convert_torchdeq_mdeq_state_dict`` maps it: block and
post-fusion convolutions to our weight-norm parametrization, the fusion convolutions folded to
their weight ``g * v / ||v||`` (the same weight: ours are plain there), the post-fusion
GroupNorm's weight and bias into a model built with ``post_gn_affine=True`` (refused, naming
the keys, otherwise). It assumes torchdeq's default weight norm (a learnt scale, no clip).

Inputs: which pixels a checkpoint expects depends on who trained it (``MDEQ_ORIGINS``):
locuslab/deq and torchdeq's zoo normalise CIFAR-10 with ``MDEQ_CIFAR_MEAN``/``MDEQ_CIFAR_STD``;
the paper group's code (minicheshire/DEQ-White-Box-Robustness and
DEQ-Regulating-Neural-Dynamics) comments its ``Normalize`` out: raw [0, 1] pixels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from deq_attacks.checkpoints import CheckpointMismatchError, load_weights

MDEQ_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
MDEQ_CIFAR_STD = (0.2023, 0.1994, 0.2010)
"""The per-channel normalisation the official CIFAR-10 training applied (cls_train.py): give
it to ``DEQEstimator(preprocessing=...)`` so that attacks work on [0, 1] pixels."""


@dataclass(frozen=True)
class MDEQOrigin:
    """Where an MDEQ checkpoint comes from: its key layout and the inputs it was trained on.

    Attributes:
        layout: ``"official"`` (locuslab/deq's ``MDEQClsNet``) or ``"torchdeq"`` (the zoo).
        mean, std: the per-channel normalisation of its training, or None for raw [0, 1]
            pixels.
        source: the code that trained it.
    """

    layout: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    source: str


MDEQ_ORIGINS = {
    "locuslab": MDEQOrigin("official", MDEQ_CIFAR_MEAN, MDEQ_CIFAR_STD, "locuslab/deq"),
    "minicheshire": MDEQOrigin(
        "official", None, None,
        "minicheshire/DEQ-White-Box-Robustness, minicheshire/DEQ-Regulating-Neural-Dynamics",
    ),
    "torchdeq": MDEQOrigin("torchdeq", MDEQ_CIFAR_MEAN, MDEQ_CIFAR_STD, "locuslab/torchdeq zoo"),
}  # fmt: skip


def mdeq_origin(name: str) -> MDEQOrigin:
    """The origin ``name``; an unknown name raises listing them."""
    if name not in MDEQ_ORIGINS:
        raise ValueError(
            f"unknown MDEQ checkpoint origin {name!r}; choose one of {', '.join(MDEQ_ORIGINS)}"
        )
    return MDEQ_ORIGINS[name]

_WNORM = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}
_BOTTLENECK = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}

# (official pattern, our key): the official key must match the whole pattern.
_RULES: tuple[tuple[str, str], ...] = (
    (r"downsample\.([0-5])\.(.+)", r"injection.net.\1.\2"),
    (r"stage0\.0\.(.+)", r"injection.net.6.\1"),
    (r"stage0\.1\.(.+)", r"injection.net.7.\1"),
    (r"fullstage\.branches\.(\d+)\.blocks\.0\.(conv[12])\.(weight_[gv])", "BLOCK_WNORM"),
    (r"fullstage\.branches\.(\d+)\.blocks\.0\.(conv[12]|gn[123])\.(.+)", r"f.blocks.\1.\2.\3"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.(\d+)\.conv\.(.+)", r"f.fuse.\1.\2.\3.0.\4"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.(\d+)\.gnorm\.(.+)", r"f.fuse.\1.\2.\3.1.\4"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.conv\.(.+)", r"f.fuse.\1.\2.0.\3"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.gnorm\.(.+)", r"f.fuse.\1.\2.1.\3"),
    (r"fullstage\.post_fuse_layers\.(\d+)\.conv\.(weight_[gv])", "POST_WNORM"),
    (r"fullstage\.post_fuse_layers\.(\d+)\.conv\.(.+)", r"f.post_fuse.\1.1.\2"),
    (r"fullstage\.post_fuse_layers\.(\d+)\.gnorm\.(.+)", r"f.post_fuse.\1.2.\2"),
    (r"incre_modules\.(\d+)\.0\.(conv[123]|bn[123])\.(.+)", "BOTTLENECK"),
    (r"incre_modules\.(\d+)\.0\.downsample\.([01])\.(.+)", r"head.incre.\1.shortcut.\2.\3"),
    (r"downsamp_modules\.(\d+)\.([01])\.(.+)", r"head.down.\1.\2.\3"),
    (r"final_layer\.([01])\.(.+)", r"head.final.\1.\2"),
    (r"classifier\.(.+)", r"head.classifier.\1"),
)
_COMPILED = tuple((re.compile(pattern), target) for pattern, target in _RULES)


def mdeq_key(official: str) -> str | None:
    """Our key for one official MDEQ key, or None when it has no counterpart (DataParallel's
    ``module.`` prefix is removed by ``deq_attacks.checkpoints.read_checkpoint``)."""
    for pattern, target in _COMPILED:
        match = pattern.fullmatch(official)
        if match is None:
            continue
        groups = match.groups()
        if target == "BLOCK_WNORM":
            return f"f.blocks.{groups[0]}.{groups[1]}.{_WNORM[groups[2]]}"
        if target == "POST_WNORM":
            return f"f.post_fuse.{groups[0]}.1.{_WNORM[groups[1]]}"
        if target == "BOTTLENECK":
            return f"head.incre.{groups[0]}.body.{_BOTTLENECK[groups[1]]}.{groups[2]}"
        return match.expand(target)
    return None


def convert_mdeq_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """The official MDEQ ``state_dict`` under ``model``'s keys (a ``pretrained_filter_fn``):
    every official key with a counterpart in ``model`` renamed, any other kept under its
    official name (so that ``deq_attacks.checkpoints.check_fits`` lists it as unexpected)."""
    expected = model.state_dict()
    converted: dict[str, Tensor] = {}
    for official, tensor in state_dict.items():
        ours = mdeq_key(official)
        converted[ours if ours is not None and ours in expected else official] = tensor
    return converted


_ZOO_FUSE_WNORM = re.compile(r"full_stage\.(fuse_layers\..+\.conv)\.weight_([gv])")
_ZOO_POST_GN = re.compile(r"full_stage\.post_fuse_layers\.\d+\.gnorm\.(weight|bias)")


def convert_torchdeq_mdeq_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """torchdeq's zoo MDEQ ``state_dict`` under ``model``'s keys (a ``pretrained_filter_fn``):
    ``full_stage.`` read as the official ``fullstage.``, each weight-normalised fusion
    convolution folded to its weight ``g * v / ||v||`` (per output channel), then
    ``convert_mdeq_state_dict``.

    Raises:
        CheckpointMismatchError: the checkpoint has an affine post-fusion GroupNorm and the
            model none (build it with ``post_gn_affine=True``), or a fusion convolution with
            only one of ``weight_g``/``weight_v``.
    """
    expected = model.state_dict()
    affine = sorted(k for k in state_dict if _ZOO_POST_GN.fullmatch(k))
    if affine and not any(".post_fuse." in k and k.endswith(".2.weight") for k in expected):
        raise CheckpointMismatchError(
            f"torchdeq's zoo MDEQ has an affine post-fusion GroupNorm ({', '.join(affine[:2])}"
            f"{' ...' if len(affine) > 2 else ''}) and the model has none: build it with "
            "post_gn_affine=True (deq_large(post_gn_affine=True))"
        )
    official: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        fuse = _ZOO_FUSE_WNORM.fullmatch(key)
        if fuse is not None:
            pairs.setdefault(fuse.group(1), {})[fuse.group(2)] = tensor
            continue
        name = "fullstage." + key[len("full_stage.") :] if key.startswith("full_stage.") else key
        official[name] = tensor
    for conv, parts in pairs.items():
        if set(parts) != {"g", "v"}:
            missing = "weight_v" if "g" in parts else "weight_g"
            raise CheckpointMismatchError(
                f"torchdeq's zoo MDEQ checkpoint lacks full_stage.{conv}.{missing} (its fusion "
                "convolutions are weight-normalised: weight_g and weight_v)"
            )
        g, v = parts["g"], parts["v"]
        norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
        official[f"fullstage.{conv}.weight"] = v * (g / norm)
    return convert_mdeq_state_dict(official, model)


_FILTERS = {"official": convert_mdeq_state_dict, "torchdeq": convert_torchdeq_mdeq_state_dict}


def load_mdeq_checkpoint(
    model: nn.Module, source: str | Path | Mapping[str, Tensor], *, layout: str = "official"
) -> nn.Module:
    """Load an MDEQ checkpoint (a ``.pth``/``.pth.tar`` path, a training checkpoint's dict
    with a ``state_dict`` entry, or a state dict) into ``model`` (``deq_large()`` or
    ``deq_xl()``; ``post_gn_affine=True`` for torchdeq's zoo); the model is untouched unless
    every key and shape fits.

    Args:
        layout: ``"official"`` (locuslab/deq and the paper group's code) or ``"torchdeq"``
            (torchdeq's zoo MDEQ); ``MDEQ_ORIGINS`` names each origin's.

    Raises:
        deq_attacks.checkpoints.CheckpointMismatchError: naming the keys with no counterpart,
            the model's keys the checkpoint lacks, and the shapes that differ.
        deq_attacks.checkpoints.CheckpointError: a file that cannot be read.
    """
    if layout not in _FILTERS:
        raise ValueError(f"layout must be one of {', '.join(_FILTERS)}, got {layout!r}")
    load_weights(model, source, filter_fn=_FILTERS[layout])
    return model
