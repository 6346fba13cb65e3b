"""Tests of the model zoo (MDEQ-Large/XL, small conv DEQ, MLP DEQ) and of VariationalDropout."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from deq_attacks.deq.dropout import VariationalDropout
from deq_attacks.models import (
    MDEQ_LARGE,
    MDEQ_XL,
    MDEQConfig,
    conv_deq_parts,
    mdeq_parts,
    mlp_deq_parts,
)
from deq_attacks.models.mdeq import mdeq_layout

#: A narrow 4-scale MDEQ with the same structure as DEQ-Large, for fast behavioural tests.
TINY = MDEQConfig(channels=(8, 16, 32, 64), head_channels=(2, 4, 8, 16), final_channels=32)


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _relative_residuals(
    f: nn.Module, inj: Tensor, z0: Tensor, steps: int, tol: float
) -> list[float]:
    """Largest per-sample ||f(z)-z|| / ||f(z)|| after each fixed-point iteration, stopping
    after `steps` iterations or once it falls below tol."""
    out: list[float] = []
    z = z0
    with torch.no_grad():
        while len(out) < steps and (not out or out[-1] >= tol):
            z_next = f(z, inj)
            diff = (z_next - z).flatten(1).norm(dim=1)
            out.append((diff / z_next.flatten(1).norm(dim=1)).max().item())
            z = z_next
    return out


@pytest.mark.parametrize(("config", "target"), [(MDEQ_LARGE, 10e6), (MDEQ_XL, 48e6)])
def test_mdeq_parameter_count_matches_paper(config: MDEQConfig, target: float) -> None:
    n = _count(*mdeq_parts(config))
    print(f"MDEQ channels={config.channels}: {n:,} parameters (paper: {target / 1e6:.0f}M)")
    assert abs(n - target) / target < 0.15


@pytest.mark.parametrize("config", [MDEQ_LARGE, MDEQ_XL])
def test_mdeq_forward_shapes(config: MDEQConfig) -> None:
    torch.manual_seed(0)
    injection, f, head = mdeq_parts(config, num_classes=10)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        inj = injection(x)
        assert inj.shape == (2, config.channels[0], 32, 32)
        z = f.init_state(inj)
        expected_dim = sum(c * (32 >> i) ** 2 for i, c in enumerate(config.channels))
        assert z.shape == (2, expected_dim)
        assert torch.count_nonzero(z) == 0
        for _ in range(2):
            z_next = f(z, inj)
            assert z_next.shape == z.shape
            assert not torch.equal(z_next, z)
            z = z_next
        logits = head(z)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(z).all()


def test_mdeq_injection_reaches_only_the_top_scale_directly() -> None:
    torch.manual_seed(0)
    injection, f, _ = mdeq_parts(TINY)
    f.eval()
    layout = mdeq_layout(TINY, 32)
    inj = injection.eval()(torch.rand(2, 3, 32, 32))
    z = torch.randn(2, layout.dim)
    with torch.no_grad():
        ys_a = [
            blk(z_i, inj if i == 0 else None)
            for i, (blk, z_i) in enumerate(zip(f.blocks, layout.unpack(z), strict=True))
        ]
        out_a = f(z, inj)
        out_b = f(z, torch.zeros_like(inj))
    assert not torch.allclose(out_a, out_b)
    # The per-scale block outputs of scales 1.. are independent of the injection.
    ys_b = [blk(z_i) for blk, z_i in zip(f.blocks, layout.unpack(z), strict=True)]
    for y_a, y_b in zip(ys_a[1:], ys_b[1:], strict=True):
        assert torch.allclose(y_a, y_b)


def test_mdeq_dropout_mask_is_fixed_until_reset() -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, dropout=0.3)
    injection, f, _ = mdeq_parts(config)
    f.train()
    drops = [m for m in f.modules() if isinstance(m, VariationalDropout)]
    assert len(drops) == config.num_scales
    with torch.no_grad():
        inj = injection(torch.rand(2, 3, 32, 32))
        z = torch.randn(2, f.layout.dim)
        first, second = f(z, inj), f(z, inj)
        for d in drops:
            d.reset_mask()
        third = f(z, inj)
    assert torch.equal(first, second)
    assert not torch.allclose(first, third)


def test_mdeq_config_validation() -> None:
    cfg = MDEQConfig(channels=[8, 16], head_channels=[2, 4], final_channels=32)  # type: ignore[arg-type]
    assert cfg.channels == (8, 16) and cfg.head_channels == (2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dropout = 0.5  # type: ignore[misc]
    bad: list[dict[str, Any]] = [
        {"head_channels": (2,)},
        {"channels": ()},
        {"channels": (8, -16)},
        {"channels": (8, 12)},
        {"final_channels": 0},
        {"expansion": 0},
        {"num_groups": 1},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"downsample_times": -1},
    ]
    for override in bad:
        kwargs: dict[str, Any] = {
            "channels": (8, 16),
            "head_channels": (2, 4),
            "final_channels": 32,
        } | override
        with pytest.raises(ValueError):
            MDEQConfig(**kwargs)


def test_mdeq_layout_checks_sizes() -> None:
    with pytest.raises(ValueError):
        mdeq_layout(MDEQ_LARGE, 36)  # 36 is not divisible by 2^3
    layout = mdeq_layout(MDEQ_LARGE, 32)
    with pytest.raises(ValueError):
        layout.unpack(torch.zeros(2, layout.dim + 1))
    z = torch.randn(3, layout.dim)
    assert torch.equal(layout.pack(layout.unpack(z)), z)


def test_small_mdeq_with_stem_downsampling() -> None:
    cfg = MDEQConfig(channels=(8, 16), head_channels=(2, 4), final_channels=32, downsample_times=1)
    injection, f, head = mdeq_parts(cfg, num_classes=3, in_channels=1, image_size=28)
    with torch.no_grad():
        inj = injection(torch.rand(2, 1, 28, 28))
        assert inj.shape == (2, 8, 14, 14)
        z = f(f.init_state(inj), inj)
        assert z.shape == (2, 8 * 14 * 14 + 16 * 7 * 7)
        assert head(z).shape == (2, 3)


@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 8), (1, 28), (3, 32)])
def test_small_conv_deq_shapes_and_size(in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    injection, f, head = conv_deq_parts(in_channels, 10, channels=16, image_size=image_size)
    n = _count(injection, f, head)
    print(f"small conv DEQ ({in_channels}x{image_size}x{image_size}): {n:,} parameters")
    assert n < 50_000
    x = torch.rand(5, in_channels, image_size, image_size)
    inj = injection(x)
    z = f(torch.zeros_like(inj), inj)
    assert z.shape == inj.shape
    assert f(z, inj).shape == z.shape
    assert head(z).shape == (5, 10)


def test_small_conv_deq_rejects_bad_channels() -> None:
    with pytest.raises(ValueError):
        conv_deq_parts(1, 10, channels=6)


def test_mlp_deq_accepts_images() -> None:
    torch.manual_seed(0)
    injection, f, head = mlp_deq_parts(in_features=3 * 8 * 8, hidden=32, num_classes=4)
    inj = injection(torch.rand(6, 3, 8, 8))
    assert inj.shape == (6, 32)
    z = f(torch.zeros_like(inj), inj)
    assert z.shape == (6, 32)
    assert head(z).shape == (6, 4)
    assert torch.linalg.matrix_norm(f.linear.weight, ord=2) < 1.0


@pytest.mark.parametrize(
    ("parts", "input_shape"),
    [
        (conv_deq_parts(1, 10, channels=16, image_size=8), (1, 8, 8)),
        (conv_deq_parts(1, 10, channels=16, image_size=28), (1, 28, 28)),
        (conv_deq_parts(3, 10, channels=16, image_size=32), (3, 32, 32)),
        (mlp_deq_parts(in_features=28 * 28, hidden=64, num_classes=10), (1, 28, 28)),
    ],
    ids=["conv8", "conv28", "conv32", "mlp"],
)
def test_fixed_point_iteration_converges_at_init(
    parts: tuple[nn.Module, nn.Module, nn.Module], input_shape: tuple[int, int, int]
) -> None:
    torch.manual_seed(0)
    injection, f, _ = parts
    with torch.no_grad():
        inj = injection(torch.rand(8, *input_shape))
    residuals = _relative_residuals(f, inj, torch.zeros_like(inj), steps=50, tol=1e-3)
    assert residuals[-1] < 1e-3, residuals[-5:]


def test_variational_dropout_mask_reuse_and_reset() -> None:
    torch.manual_seed(0)
    drop = VariationalDropout(0.5).train()
    x = torch.ones(4, 8, 3, 3)
    first = drop(x)
    assert drop.mask is not None and drop.mask.shape == (4, 8, 1, 1)
    assert set(first.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(first[..., :1, :1].expand_as(first), first)  # per sample and channel
    assert torch.equal(drop(x), first)
    assert torch.equal(drop(2 * x), 2 * first)
    drop.reset_mask()
    assert drop.mask is None
    assert not torch.equal(drop(x), first)


def test_variational_dropout_2d_eval_and_zero_p() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    drop = VariationalDropout(0.3).train()
    y = drop(x)
    assert drop.mask is not None and drop.mask.shape == (5, 7)
    assert torch.equal(drop(x), y)
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(VariationalDropout(0.0).train()(x), x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_variational_dropout_rejects_bad_p(p: float) -> None:
    with pytest.raises(ValueError):
        VariationalDropout(p)


def test_variational_dropout_batch_change_needs_reset() -> None:
    drop = VariationalDropout(0.2).train()
    drop(torch.ones(4, 3, 2, 2))
    with pytest.raises(ValueError, match="reset_mask"):
        drop(torch.ones(3, 3, 2, 2))
    drop.reset_mask()
    assert drop(torch.ones(3, 3, 2, 2)).shape == (3, 3, 2, 2)


def test_builders_return_working_deqs() -> None:
    from deq_attacks.deq.model import DEQ
    from deq_attacks.models import deq_large, deq_xl, mlp_deq, small_conv_deq

    for model in (deq_large(), deq_xl()):
        assert isinstance(model, DEQ)
    for model in (small_conv_deq(), mlp_deq(784, 10)):
        assert isinstance(model, DEQ)
        logits = model.eval()(torch.rand(3, 1, 28, 28))
        assert logits.shape == (3, 10)
        assert torch.isfinite(logits).all()


def test_builders_declare_the_input_shape_and_inject_refuses_others() -> None:
    """An 8x8 small conv DEQ once ran the whole protocol on 28x28 MNIST (its pooled head
    accepts any size): the declared shape now refuses it."""
    from deq_attacks.adapters import from_f
    from deq_attacks.models import deq_large, small_conv_deq

    small = small_conv_deq(in_channels=1, image_size=8).eval()
    assert small.input_shape == (1, 8, 8) and deq_large().input_shape == (3, 32, 32)
    assert small(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with torch.no_grad():
        small.injection(torch.rand(2, 1, 28, 28))  # the parts alone would run on it
    with pytest.raises(ValueError, match=r"sample shape \(1, 28, 28\), but this DEQ was built"):
        small(torch.rand(2, 1, 28, 28))
    plain = from_f(nn.Linear(4, 4), nn.Linear(4, 2), input_shape=(4,))
    assert plain.input_shape == (4,)
    with pytest.raises(ValueError, match="built for"):
        plain(torch.rand(3, 5))
    assert from_f(nn.Linear(4, 4), nn.Linear(4, 2)).input_shape is None
    for bad in ((), (1, 0), (1.5, 2), (True,)):
        with pytest.raises(ValueError, match="input_shape must be positive ints"):
            from_f(nn.Linear(4, 4), nn.Linear(4, 2), input_shape=bad)
