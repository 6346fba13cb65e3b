"""Checkpoints in the layouts people have: the paper group's ``.pth.tar`` training dicts, bare
state dicts with DataParallel prefixes, torchdeq's zoo MDEQ (``full_stage.``, weight-normalised
fusion convolutions, affine post-fusion GroupNorm); their input normalisation per origin; and
torchdeq settings that torchdeq would silently drop (its issue #12).

The state dicts are built here with each layout's key names (the official ones from
``tests/test_adapters_mdeq.py``, renamed as torchdeq's zoo names them)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import torchdeq
from torch import Tensor, nn

from deq_attacks.adapters import (
    MDEQ_CIFAR_MEAN,
    MDEQ_CIFAR_STD,
    load_mdeq_checkpoint,
    mdeq_origin,
)
from deq_attacks.adapters.torchdeq import TORCHDEQ_SETTINGS, from_torchdeq, torchdeq_core
from deq_attacks.checkpoints import CheckpointMismatchError
from deq_attacks.models import MDEQ_LARGE, deq_large
from tests.test_adapters_mdeq import official_state_dict


@pytest.fixture(scope="module")
def official() -> dict[str, Tensor]:
    return official_state_dict(MDEQ_LARGE, seed=3)


def zoo_state_dict(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchdeq's zoo MDEQ keys: ``full_stage.``, every fusion conv as weight_g/weight_v, an
    affine post-fusion GroupNorm (distinct random values)."""
    gen = torch.Generator().manual_seed(7)
    zoo: dict[str, Tensor] = {}
    for key, value in official.items():
        if not key.startswith("fullstage."):
            zoo[key] = value
            continue
        key = "full_stage." + key[len("fullstage.") :]
        if ".fuse_layers." in key and key.endswith(".conv.weight"):
            base = key[: -len(".weight")]
            zoo[f"{base}.weight_g"] = torch.rand(value.shape[0], 1, 1, 1, generator=gen) + 0.5
            zoo[f"{base}.weight_v"] = value
        else:
            zoo[key] = value
    for i, c in enumerate(MDEQ_LARGE.channels):
        zoo[f"full_stage.post_fuse_layers.{i}.gnorm.weight"] = torch.rand(c, generator=gen) + 0.5
        zoo[f"full_stage.post_fuse_layers.{i}.gnorm.bias"] = 0.1 * torch.randn(c, generator=gen)
    return zoo


def training_checkpoint(state: dict[str, Tensor]) -> dict[str, object]:
    """What the paper group's (and locuslab/deq's) ``save_checkpoint`` writes."""
    weight = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight], lr=1e-3)
    weight.grad = torch.ones(3)
    optimizer.step()
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100)
    return {
        "epoch": 12, "model": "mdeq", "state_dict": state, "perf": torch.tensor(0.81),
        "optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
        "train_global_steps": 4000,
    }  # fmt: skip


def test_the_paper_groups_pth_tar_training_checkpoint_loads(
    official: dict[str, Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(training_checkpoint(official), path)
    model = load_mdeq_checkpoint(deq_large(), path)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["head.classifier.bias"], official["classifier.bias"])
    bare = tmp_path / "final_state.pth"
    torch.save({f"module.{k}": v for k, v in official.items()}, bare)
    model = load_mdeq_checkpoint(deq_large(), bare)
    torch.testing.assert_close(model.state_dict()["injection.net.0.weight"],
                               official["downsample.0.weight"])  # fmt: skip
    broken = dict(official)
    del broken["fullstage.branches.1.blocks.0.gn2.bias"]
    torch.save(training_checkpoint(broken), path)
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing from the checkpoint: f\.blocks\.1\.gn2\.bias"):  # fmt: skip
        load_mdeq_checkpoint(deq_large(), path)


def test_torchdeq_zoo_mdeq_loads_with_fusion_weight_norm_folded(
    official: dict[str, Tensor], tmp_path: Path
) -> None:
    zoo = zoo_state_dict(official)
    path = tmp_path / "zoo.pth"
    torch.save({"state_dict": zoo}, path)
    model = load_mdeq_checkpoint(deq_large(post_gn_affine=True), path, layout="torchdeq")
    loaded = model.state_dict()
    g = zoo["full_stage.fuse_layers.2.0.net.1.conv.weight_g"]
    v = zoo["full_stage.fuse_layers.2.0.net.1.conv.weight_v"]
    want = v * g / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loaded["f.fuse.2.0.1.0.weight"], want)
    torch.testing.assert_close(loaded["f.post_fuse.3.2.bias"],
                               zoo["full_stage.post_fuse_layers.3.gnorm.bias"])  # fmt: skip
    torch.testing.assert_close(
        loaded["f.blocks.0.conv1.parametrizations.weight.original0"],
        zoo["full_stage.branches.0.blocks.0.conv1.weight_g"],
    )
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()


def test_torchdeq_zoo_mdeq_refusals_name_what_cannot_map(official: dict[str, Tensor]) -> None:
    zoo = zoo_state_dict(official)
    with pytest.raises(CheckpointMismatchError,
                       match=r"affine post-fusion GroupNorm \(full_stage\.post_fuse_layers\.0"
                             r"\.gnorm\.bias.*post_gn_affine=True"):  # fmt: skip
        load_mdeq_checkpoint(deq_large(), zoo, layout="torchdeq")
    gone = "full_stage.branches.3.blocks.0.gn3.weight"
    missing = {k: v for k, v in zoo.items() if k != gone}
    with pytest.raises(CheckpointMismatchError, match=r"missing .*: f\.blocks\.3\.gn3\.weight"):
        load_mdeq_checkpoint(deq_large(post_gn_affine=True), missing, layout="torchdeq")
    gone = "full_stage.fuse_layers.0.1.net.conv.weight_v"
    half = {k: v for k, v in zoo.items() if k != gone}
    with pytest.raises(CheckpointMismatchError, match=r"lacks " + re.escape(gone)):
        load_mdeq_checkpoint(deq_large(post_gn_affine=True), half, layout="torchdeq")
    with pytest.raises(CheckpointMismatchError, match="no place in the model: full_stage"):
        load_mdeq_checkpoint(deq_large(post_gn_affine=True), zoo)  # the official layout
    with pytest.raises(ValueError, match="layout must be one of official, torchdeq"):
        load_mdeq_checkpoint(deq_large(), zoo, layout="timm")


def test_each_origin_states_its_input_normalisation() -> None:
    assert mdeq_origin("minicheshire").mean is None and mdeq_origin("minicheshire").std is None
    for name in ("locuslab", "torchdeq"):
        origin = mdeq_origin(name)
        assert (origin.mean, origin.std) == (MDEQ_CIFAR_MEAN, MDEQ_CIFAR_STD)
    assert mdeq_origin("torchdeq").layout == "torchdeq"
    with pytest.raises(ValueError, match="choose one of locuslab, minicheshire, torchdeq"):
        mdeq_origin("robustbench")


def test_torchdeq_settings_it_would_drop_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'stop_mode' \(did you mean 'f_stop_mode'"):
        torchdeq_core(f_solver="broyden", stop_mode="rel")
    with pytest.raises(ValueError, match=r"'lr'"):
        torchdeq_core(lr=0.1)
    assert torchdeq_core(f_solver="broyden", f_stop_mode="rel").f_stop_mode == "rel"
    silently = torchdeq.get_deq(f_solver="broyden", stop_mode="rel")
    assert silently.f_stop_mode == "abs"  # what torchdeq itself does: the setting is dropped
    with pytest.raises(ValueError, match=r"built with 'stop_mode'.*torchdeq ignored"):
        from_torchdeq(nn.Identity(), nn.Identity(), nn.Identity(), silently)
    # a script's own options beside torchdeq's (an argparse namespace) are no near miss
    core = torchdeq.get_deq(f_solver="broyden", f_max_iter=6, epochs=3, cfg="large.yaml")
    from_torchdeq(nn.Identity(), nn.Identity(), nn.Identity(), core)
    # every name on our list is one torchdeq reads
    source = "\n".join(inspect.getsource(m) for m in (torchdeq.core, torchdeq.norm.base_norm,
                                                       torchdeq.norm.weight_norm,
                                                       torchdeq.norm.spectral_norm))  # fmt: skip
    read = set(re.findall(r"args\.get\(['\"](\w+)['\"]", source))
    assert read | {"core"} >= TORCHDEQ_SETTINGS, TORCHDEQ_SETTINGS - read
