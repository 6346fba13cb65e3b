"""Official MDEQ checkpoints (locuslab/deq MDEQ-Vision, the paper's fork) into deq_large/deq_xl.

The state dicts are synthetic: every key and shape is written out here from the official
``MDEQClsNet`` (mdeq.py, mdeq_core.py, cls_mdeq_LARGE_reg.yaml: 4 branches, one BASIC block
each, expansion 5, weight norm with ``weight_g``/``weight_v``, affine block and fusion
GroupNorms, non-affine post-fusion GroupNorm, Bottleneck head with non-affine BatchNorms),
independently of our key map, filled with distinct random values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from deq_attacks.adapters import convert_mdeq_state_dict, load_mdeq_checkpoint, mdeq_key
from deq_attacks.checkpoints import CheckpointError, CheckpointMismatchError
from deq_attacks.models import MDEQ_LARGE, MDEQ_XL, MDEQConfig, deq_large, deq_xl

Shapes = dict[str, tuple[int, ...]]


def _bn(prefix: str, c: int, affine: bool = True) -> Shapes:
    out: Shapes = {f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,)}
    out[f"{prefix}.num_batches_tracked"] = ()
    if affine:
        out |= {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}
    return out


def _gn(prefix: str, c: int) -> Shapes:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def official_shapes(config: MDEQConfig, num_classes: int = 10) -> Shapes:
    """Key -> shape of ``MDEQClsNet(cfg).state_dict()`` for a CIFAR config (DOWNSAMPLE_TIMES 0)."""
    ch, heads, e = config.channels, config.head_channels, config.expansion
    c0 = ch[0]
    s: Shapes = {"downsample.0.weight": (c0, 3, 3, 3), "downsample.3.weight": (c0, c0, 3, 3)}
    s |= _bn("downsample.1", c0) | _bn("downsample.4", c0)
    s |= {"stage0.0.weight": (c0, c0, 1, 1)} | _bn("stage0.1", c0)
    for i, c in enumerate(ch):
        block = f"fullstage.branches.{i}.blocks.0"
        s |= {
            f"{block}.conv1.weight_g": (e * c, 1, 1, 1),
            f"{block}.conv1.weight_v": (e * c, c, 3, 3),
        }
        s |= {f"{block}.conv2.weight_g": (c, 1, 1, 1), f"{block}.conv2.weight_v": (c, e * c, 3, 3)}
        s |= _gn(f"{block}.gn1", e * c) | _gn(f"{block}.gn2", c) | _gn(f"{block}.gn3", c)
        post = f"fullstage.post_fuse_layers.{i}.conv"
        s |= {f"{post}.weight_g": (c, 1, 1, 1), f"{post}.weight_v": (c, c, 1, 1)}
        for j, cj in enumerate(ch):
            fuse = f"fullstage.fuse_layers.{i}.{j}.net"
            if j > i:  # UpsampleModule: 1x1 conv and GroupNorm
                s |= {f"{fuse}.conv.weight": (c, cj, 1, 1)} | _gn(f"{fuse}.gnorm", c)
            for k in range(i - j):  # DownsampleModule: strided 3x3 convs
                out = c if k == i - j - 1 else cj
                s |= {f"{fuse}.{k}.conv.weight": (out, cj, 3, 3)} | _gn(f"{fuse}.{k}.gnorm", out)
        incre, h = f"incre_modules.{i}.0", heads[i]
        s |= {f"{incre}.conv1.weight": (h, c, 1, 1), f"{incre}.conv2.weight": (h, h, 3, 3)}
        s |= {f"{incre}.conv3.weight": (4 * h, h, 1, 1)}
        s |= _bn(f"{incre}.bn1", h, False) | _bn(f"{incre}.bn2", h, False)
        s |= _bn(f"{incre}.bn3", 4 * h, False)
        s |= {f"{incre}.downsample.0.weight": (4 * h, c, 1, 1)} | _bn(
            f"{incre}.downsample.1", 4 * h
        )
        if i + 1 < len(ch):
            down, h2 = f"downsamp_modules.{i}", heads[i + 1]
            s |= {f"{down}.0.weight": (4 * h2, 4 * h, 3, 3), f"{down}.0.bias": (4 * h2,)}
            s |= _bn(f"{down}.1", 4 * h2)
    f = config.final_channels
    s |= {"final_layer.0.weight": (f, 4 * heads[-1], 1, 1), "final_layer.0.bias": (f,)}
    s |= _bn("final_layer.1", f)
    s |= {"classifier.weight": (num_classes, f), "classifier.bias": (num_classes,)}
    return s


def official_state_dict(config: MDEQConfig, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, shape in official_shapes(config).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(123)
        elif key.endswith("running_var") or key.endswith("weight_g"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = 0.05 * torch.randn(shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def large_state() -> dict[str, Tensor]:
    return official_state_dict(MDEQ_LARGE)


def _snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_official_keys_map_one_to_one_onto_deq_large(large_state: dict[str, Tensor]) -> None:
    ours = deq_large().state_dict()
    mapped = {mdeq_key(k) for k in large_state}
    assert None not in mapped
    assert mapped == set(ours) and len(large_state) == len(ours) == 216


def test_official_state_dict_loads_into_deq_large(large_state: dict[str, Tensor]) -> None:
    model = load_mdeq_checkpoint(deq_large(), large_state)
    loaded = model.state_dict()
    for key, value in large_state.items():
        torch.testing.assert_close(loaded[mdeq_key(key)], value, rtol=0, atol=0)
    f = model.f.blocks[2].conv1  # weight = g * v / ||v|| per output channel, as the official
    g = large_state["fullstage.branches.2.blocks.0.conv1.weight_g"]
    v = large_state["fullstage.branches.2.blocks.0.conv1.weight_v"]
    want = v * (g / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(f.weight, want, rtol=1e-6, atol=1e-7)
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_checkpoint_file_with_dataparallel_prefix_and_state_dict_entry_loads(
    large_state: dict[str, Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "checkpoint.pth.tar"
    wrapped = {f"module.{k}": v for k, v in large_state.items()}
    torch.save({"epoch": 3, "state_dict": wrapped, "perf": 0.5}, path)
    model = load_mdeq_checkpoint(deq_large(), path)
    key = "head.classifier.weight"
    torch.testing.assert_close(model.state_dict()[key], large_state["classifier.weight"])


def test_wrong_shape_is_refused_naming_the_key_and_the_model_is_untouched(
    large_state: dict[str, Tensor],
) -> None:
    model = deq_large()
    before = _snapshot(model)
    bad = dict(large_state)
    bad["fullstage.branches.1.blocks.0.gn2.weight"] = torch.ones(65)
    with pytest.raises(
        CheckpointMismatchError, match=r"f\.blocks\.1\.gn2\.weight \(65,\) vs model \(64,\)"
    ):
        load_mdeq_checkpoint(model, bad)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_key_is_refused_naming_it_and_the_model_is_untouched(
    large_state: dict[str, Tensor],
) -> None:
    model = deq_large()
    before = _snapshot(model)
    bad = {k: v for k, v in large_state.items() if k != "final_layer.1.running_var"}
    with pytest.raises(
        CheckpointMismatchError, match=r"missing from the checkpoint: head\.final\.1\.running_var"
    ):
        load_mdeq_checkpoint(model, bad)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unexpected_official_key_is_refused_naming_it(large_state: dict[str, Tensor]) -> None:
    bad = dict(large_state)
    bad["fullstage.post_fuse_layers.0.gnorm.weight"] = torch.ones(32)  # POST_GN_AFFINE: true
    bad["fullstage.branches.0.blocks.1.conv1.weight_g"] = torch.ones(160, 1, 1, 1)  # 2 blocks
    converted = convert_mdeq_state_dict(bad, deq_large())  # unmapped keys keep their names
    assert "fullstage.post_fuse_layers.0.gnorm.weight" in converted
    with pytest.raises(CheckpointMismatchError, match="no place in the model") as error:
        load_mdeq_checkpoint(deq_large(), bad)
    assert "fullstage.post_fuse_layers.0.gnorm.weight" in str(error.value)
    assert "fullstage.branches.0.blocks.1.conv1.weight_g" in str(error.value)


def test_a_large_checkpoint_is_refused_by_deq_xl(large_state: dict[str, Tensor]) -> None:
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_mdeq_checkpoint(deq_xl(), large_state)


def test_xl_checkpoint_maps_onto_deq_xl() -> None:
    shapes = official_shapes(MDEQ_XL)
    ours = deq_xl().state_dict()
    assert {mdeq_key(k): s for k, s in shapes.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_mdeq_checkpoint(deq_large(), path)
    with pytest.raises(FileNotFoundError):
        load_mdeq_checkpoint(deq_large(), tmp_path / "absent.pth")
