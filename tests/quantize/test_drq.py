"""DRQ runtime: the region predictor against a naive loop, the mixed convolution against pure
INT8 / INT4 convolutions, and the INT4-region bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize.drq import (
    DRQConv2d,
    DRQLayerSettings,
    apply_drq,
    drq_modules,
    low_scale,
    region_mask,
    region_means,
    region_sums,
    upsample_mask,
)
from quantize.graph import find_layers
from quantize.primitives import fake_quantize_weight, quantize_activation
from sensitivity import zoo


def naive_mask(codes: torch.Tensor, region: tuple[int, int], threshold: float) -> torch.Tensor:
    """Loop over every region and pixel; exact integer arithmetic."""
    x, y = region
    n, c, h, w = codes.shape
    rows, cols = math.ceil(h / y), math.ceil(w / x)
    out = torch.zeros(n, rows, cols, dtype=torch.bool)
    for b in range(n):
        for i in range(rows):
            for j in range(cols):
                total, count = 0, 0
                for ch in range(c):
                    for p in range(i * y, min((i + 1) * y, h)):
                        for q in range(j * x, min((j + 1) * x, w)):
                            total += abs(int(codes[b, ch, p, q]))
                            count += 1
                out[b, i, j] = total / count >= threshold
    return out


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 4),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    rx=st.integers(1, 5),
    ry=st.integers(1, 5),
    signed=st.booleans(),
    threshold=st.integers(0, 140),
    seed=st.integers(0, 2**16),
)
def test_region_mask_matches_naive_loop(n, c, h, w, rx, ry, signed, threshold, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    lo = -127 if signed else 0
    codes = torch.randint(lo, 128 if signed else 256, (n, c, h, w), generator=gen)
    expected = naive_mask(codes, (rx, ry), threshold)
    got_float = region_mask(codes.float(), (rx, ry), threshold)
    assert got_float.shape == (n, math.ceil(h / ry), math.ceil(w / rx))
    assert got_float.dtype == torch.bool
    assert torch.equal(got_float, expected)
    # integer dtypes give the same mask (int16 holds both grids)
    assert torch.equal(region_mask(codes.to(torch.int16), (rx, ry), threshold), expected)


def test_region_means_partial_edges_average_their_own_pixels() -> None:
    # 1 channel, 3x5 map, 2x2 regions: the last row/column of regions are partial.
    codes = torch.arange(15, dtype=torch.float32).reshape(1, 1, 3, 5)
    means = region_means(codes, (2, 2))
    assert means.shape == (1, 2, 3)
    assert means[0, 0, 0] == (0 + 1 + 5 + 6) / 4
    assert means[0, 0, 2] == (4 + 9) / 2  # 2 pixels
    assert means[0, 1, 1] == (12 + 13) / 2
    assert means[0, 1, 2] == 14  # a single pixel


def test_threshold_is_inclusive_and_uses_channel_mean() -> None:
    codes = torch.zeros(1, 2, 2, 2)
    codes[0, 0] = 10  # channel mean 5 everywhere
    assert region_mask(codes, (2, 2), 5).all()
    assert not region_mask(codes, (2, 2), 5.0001).any()
    assert region_mask(-codes, (1, 1), 5).all()  # |code|


def test_upsample_mask_crops_partial_regions() -> None:
    mask = torch.tensor([[[True, False], [False, True]]])
    up = upsample_mask(mask, (3, 2), 3, 5)  # regions 3 wide, 2 high on a 3x5 map
    assert up.shape == (1, 1, 3, 5)
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(up[0, 0], expected)


def test_bad_region_is_refused() -> None:
    with pytest.raises(ValueError, match="region"):
        region_mask(torch.zeros(1, 1, 4, 4), (0, 2), 1)
    with pytest.raises(ValueError, match="N, C, H, W"):
        region_mask(torch.zeros(4, 4), (2, 2), 1)


def _layer(signed: bool, w_bits: int = 8, region=(2, 3), threshold: int = 0, groups: int = 1):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 4 // groups, 3, 3, generator=gen)
    bias = torch.randn(6, generator=gen)
    x = torch.randn(2, 4, 9, 7, generator=gen)
    if not signed:
        x = x.relu()
    amax = float(x.abs().max())
    scale = amax / (127 if signed else 255)
    conv = DRQConv2d(
        weight, bias, (1, 2), (1, 0), 1, groups, scale, signed, region, threshold, w_bits
    )
    return conv, weight, bias, x, scale


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("w_bits", [8, 6, 3])
def test_threshold_zero_is_pure_int8_and_unreachable_is_pure_int4(signed, w_bits) -> None:
    conv, weight, bias, x, scale = _layer(signed, w_bits)
    x8 = quantize_activation(x, scale, 8, signed) * scale
    w8 = fake_quantize_weight(weight, w_bits)
    ref8 = F.conv2d(x8, w8, bias, (1, 2), (1, 0))
    torch.testing.assert_close(conv(x), ref8, rtol=0, atol=1e-5)
    assert conv.last_int4_fraction == 0.0

    s4 = scale * ((127 / 7) if signed else 17)
    assert math.isclose(low_scale(scale, signed), s4)
    x4 = quantize_activation(x, s4, 4, signed) * s4
    assert x4.unique().numel() <= (15 if signed else 16)
    w4 = fake_quantize_weight(weight, min(w_bits, 4))
    ref4 = F.conv2d(x4, w4, bias, (1, 2), (1, 0))
    conv.threshold = 256  # above any mean |INT8 code|
    torch.testing.assert_close(conv(x), ref4, rtol=0, atol=1e-5)
    assert conv.last_int4_fraction == 1.0
    assert not torch.allclose(ref8, ref4, atol=1e-3)  # the two precisions differ here


def test_mixed_mask_runs_each_region_at_its_precision_and_counts_int4_regions() -> None:
    conv, weight, bias, x, scale = _layer(signed=False, region=(2, 3), groups=2)
    codes = quantize_activation(x, scale, 8, False)
    means = region_means(codes, (2, 3))
    conv.threshold = int(means.median().round())
    mask = region_mask(codes, (2, 3), conv.threshold)
    assert 0 < int(mask.sum()) < mask.numel()
    # Reference: per-pixel choice of the input, then one conv per precision.
    m = upsample_mask(mask, (2, 3), 9, 7).float()
    x8 = codes * scale
    s4 = scale * 17
    x4 = quantize_activation(x, s4, 4, False) * s4
    ref = F.conv2d(x8 * m, fake_quantize_weight(weight, 8), None, (1, 2), (1, 0), 1, 2)
    ref = ref + F.conv2d(x4 * (1 - m), fake_quantize_weight(weight, 4), None, (1, 2), (1, 0), 1, 2)
    ref = ref + bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-5)
    expected = 1 - float(mask.float().mean())
    assert math.isclose(conv.last_int4_fraction, expected)
    # running totals over two forwards of different sizes
    conv.reset_stats()
    conv(x)
    conv(x[:1])
    low = (mask.numel() - int(mask.sum())) + (mask[:1].numel() - int(mask[:1].sum()))
    assert conv.int4_regions == low
    assert conv.total_regions == mask.numel() + mask[:1].numel()
    assert math.isclose(conv.int4_fraction, low / conv.total_regions)


def test_apply_drq_folds_bn_and_matches_the_module() -> None:
    torch.manual_seed(0)
    model = zoo.DigitsCNN(width=4)
    with torch.no_grad():  # non-trivial BN statistics so that folding matters
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.rand(5, 1, 8, 8)
    ep = zoo.export(model, x[:2])
    gm = ep.module()
    layers = find_layers(gm)
    # threshold 0 with 16-bit "high" precision: the DRQ conv is the folded conv up to rounding
    settings_ = {
        layer.name: DRQLayerSettings(1e-4, True, (2, 2), 0, 16, 16, 8)
        for layer in layers
        if layer.kind == "conv2d"
    }
    out = apply_drq(gm, layers, settings_)(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=2e-3)
    mods = drq_modules(gm)
    assert len(mods) == 2
    assert all(m.last_int4_fraction == 0.0 for m in mods.values())
    assert not any(n.target == torch.ops.aten.batch_norm.default for n in gm.graph.nodes)


def test_apply_drq_refuses_linear_and_unknown_layers() -> None:
    gm = zoo.export(zoo.DigitsCNN(width=2), torch.rand(2, 1, 8, 8)).module()
    layers = find_layers(gm)
    s = DRQLayerSettings(0.01, False, (2, 2), 3)
    with pytest.raises(ValueError, match="conv2d"):
        apply_drq(gm, layers, {"fc": s})
    with pytest.raises(ValueError, match="unknown"):
        apply_drq(gm, layers, {"nope": s})


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
       rx=st.integers(1, 4), ry=st.integers(1, 4),
       dtype=st.sampled_from([torch.int8, torch.int32, torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_a_channel_plane_pooled_per_region_is_region_sums(n, c, h, w, rx, ry, dtype,
                                                          seed) -> None:
    """The region calibration reduces a map over channels once and pools that plane for
    every region size: the same sums and counts as ``region_sums`` on the map."""
    from quantize.drq import channel_plane, plane_region_sums

    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (n, c, h, w), generator=gen).to(dtype)
    sums, counts = region_sums(x, (rx, ry))
    got_sums, got_counts = plane_region_sums(channel_plane(x), (rx, ry), c)
    assert torch.equal(got_sums, sums) and torch.equal(got_counts, counts)
