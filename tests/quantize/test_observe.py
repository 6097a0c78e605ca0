"""quantize.observe: the one layer-input range pass (against forward hooks on the trained
module), padding and chunking, errors, JSON, and quantize.apply with and without it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize import QuantizeConfig, apply
from quantize.calibrate import f32
from quantize.data import CalibrationSet
from quantize.graph import find_layers
from quantize.observe import ActivationStats, InputStats, observe
from quantize.primitives import activation_scale
from solver.errors import BadCalibrationError


def test_ranges_are_the_layer_inputs_of_the_trained_module(cnn, cnn_program, calib_digits):
    x = calib_digits[0][:50]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [getattr(cnn, name).register_forward_pre_hook(
        lambda m, args, name=name: seen.setdefault(name, []).append(args[0].detach()))
        for name in ("conv1", "conv2", "fc")]
    try:
        with torch.no_grad():
            cnn(x)
    finally:
        for h in hooks:
            h.remove()
    gm = cnn_program.module()
    stats = observe(gm, find_layers(gm), CalibrationSet((x,)), 16)
    assert stats.samples == 50 and set(stats.layers) == {"conv1", "conv2", "fc"}
    for name, (a,) in seen.items():
        s = stats[name]
        assert s.shape == tuple(a.shape[1:]) and s.numel == a.numel()
        # eager module vs exported graph: the same aten ops; 1e-6 relative covers a different
        # kernel choice (the values here are equal on the machine this was written on)
        assert s.lo == pytest.approx(float(a.min()), rel=1e-6, abs=1e-7)
        assert s.hi == pytest.approx(float(a.max()), rel=1e-6)
        assert stats.grid(name, 8) == activation_scale(s.lo, s.hi, 8)


def test_chunks_and_padding_do_not_change_the_statistics(cnn_program, cnn_fixed_batch_pt2,
                                                         calib_digits):
    data = CalibrationSet((calib_digits[0][:37],))  # 37 = 2 x 16 + 5: the last batch padded
    gm = cnn_program.module()
    layers = find_layers(gm)
    whole = observe(gm, layers, data, 37)
    assert observe(gm, layers, data, 5) == whole
    fixed_gm = torch.export.load(str(cnn_fixed_batch_pt2)).module()
    padded = observe(fixed_gm, find_layers(fixed_gm), data, 16, fixed=True)
    assert padded == whole  # padding rows (copies of a real sample) are not counted


def test_non_finite_inputs_and_layers_that_never_ran(cnn_program):
    gm = cnn_program.module()
    x = torch.rand(4, 1, 8, 8)
    x[2, 0, 3, 3] = math.nan
    with pytest.raises(BadCalibrationError, match="conv1"):
        observe(gm, find_layers(gm), CalibrationSet((x,)), 4)
    never = ActivationStats({"fc": InputStats(math.inf, -math.inf, 0, ())}, 0)
    with pytest.raises(BadCalibrationError, match="never ran"):
        never.grid("fc", 8)
    with pytest.raises(KeyError, match="conv9"):
        never["conv9"]


def test_json_round_trip(cnn_program, calib_digits):
    gm = cnn_program.module()
    stats = observe(gm, find_layers(gm), CalibrationSet((calib_digits[0][:20],)), 8)
    stats = ActivationStats({**stats.layers, "unused": InputStats(math.inf, -math.inf, 0, ())},
                            stats.samples, sums=stats.sums)
    back = ActivationStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back == stats
    # the input sums exactly (float64 bits), with their counts and shapes
    assert back.sums.keys() == stats.sums.keys() == {"conv1", "conv2", "fc"}
    for name, s in stats.sums.items():
        assert torch.equal(back.sums[name].total, s.total) and back.sums[name].count == s.count
        assert s.total.dtype == torch.float64
    # the free points' ranges (version 3), by chain-end node, exactly
    gm = cnn_program.module()
    full = observe(gm, find_layers(gm), CalibrationSet((calib_digits[0][:20],)), 8)
    assert full.points and full.version == 3
    assert ActivationStats.from_dict(json.loads(json.dumps(full.to_dict()))).points \
        == full.points
    # version 2 (no points) and version 1 (no sums) are still read
    two = {k: v for k, v in full.to_dict().items() if k != "points"}
    assert ActivationStats.from_dict({**two, "version": 2}).points == {}
    old = {k: v for k, v in two.items() if k != "sums"}
    assert ActivationStats.from_dict({**old, "version": 1}).sums == {}
    with pytest.raises(ValueError, match="version"):
        ActivationStats.from_dict({**stats.to_dict(), "version": 99})


def test_apply_with_handed_down_statistics_equals_apply_observing_itself(
        cnn_program, plan_for, heldout_eval, cnn_int8):
    train, holdout = heldout_eval
    gm = cnn_program.module()
    stats = observe(gm, find_layers(gm), train, 64)
    handed = apply(cnn_program, plan_for(cnn_program), train, holdout, QuantizeConfig(),
                   activations=stats)
    assert handed.tensors.keys() == cnn_int8.tensors.keys()
    for k, t in cnn_int8.tensors.items():
        assert torch.equal(handed.tensors[k], t), k
    # and the handed-down ranges are what apply uses: a wider range gives a coarser grid
    wide = ActivationStats({n: InputStats(s.lo, 2 * s.hi, s.numel, s.shape)
                            for n, s in stats.layers.items()}, stats.samples)
    res = apply(cnn_program, plan_for(cnn_program), train, holdout, QuantizeConfig(),
                activations=wide)
    for name in ("conv2", "fc"):
        scale, _ = wide.grid(name, 8)
        assert res.checkpoint.input_grid(name).scale == f32(scale)
        assert res.checkpoint.input_grid(name).scale != cnn_int8.checkpoint.input_grid(name).scale
    # percentile calibration clips each range from its own histogram: the statistics are not used
    pct = QuantizeConfig(calibration="percentile", percentile=99.0)
    a = apply(cnn_program, plan_for(cnn_program), train, holdout, pct, activations=wide)
    b = apply(cnn_program, plan_for(cnn_program), train, holdout, pct)
    assert a.checkpoint.input_grid("conv2") == b.checkpoint.input_grid("conv2")


def _conv_grad_taps(layer, x: torch.Tensor) -> torch.Tensor:
    """Reference: the per-tap input sums as the weight gradient of the summed output of a
    float64 conv with one output channel per group (torch's own padding and stride)."""
    import torch.nn.functional as F
    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d}[layer.kind]
    w = torch.zeros(layer.groups, *layer.weight_shape[1:], dtype=torch.float64,
                    requires_grad=True)
    out = conv(x.double(), w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    (grad,) = torch.autograd.grad(out.sum(), w)
    return grad


@settings(max_examples=60, deadline=None)
@given(nd=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 3]), cin_g=st.integers(1, 3),
       kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.one_of(st.integers(0, 3), st.just("same"), st.just("valid")),
       size=st.integers(5, 12), seed=st.integers(0, 2**16))
def test_tap_sums_equal_the_conv_weight_gradient(nd, groups, cin_g, kernel, stride, dilation,
                                                 padding, size, seed):
    """tap_sums (one strided slice per kernel offset) equals the weight gradient of a conv of
    the same geometry, for 1-d/2-d, groups, strides, dilations, int / "same" / "valid"
    padding; the count is samples x output positions."""
    from hypothesis import assume

    from quantize.graph import GraphLayer
    from quantize.observe import tap_sums
    if padding == "same":
        stride = 1  # torch refuses "same" with a stride
    assume(size + 2 * (padding if isinstance(padding, int) else 0) > dilation * (kernel - 1))
    cin = groups * cin_g
    layer = GraphLayer(name="c", kind=f"conv{nd}d", node="c", weight="c.weight", bias=None,
                       weight_shape=(groups * 2, cin_g) + (kernel,) * nd, groups=groups,
                       stride=(stride,) * nd,
                       padding=padding if isinstance(padding, str) else (padding,) * nd,
                       dilation=(dilation,) * nd)
    x = torch.randn((3, cin) + (size,) * nd, generator=torch.Generator().manual_seed(seed))
    total, count = tap_sums(layer, x)
    expected = _conv_grad_taps(layer, x.sum(0, keepdim=True).double())
    assert total.shape == expected.shape
    # both float64 sums of the same float32 batch sum, in another order: 1e-12 relative to
    # the sum of magnitudes (measured ~1e-16)
    scale = float(x.abs().sum()) + 1.0
    assert torch.allclose(total, expected, rtol=0, atol=1e-12 * scale)
    import torch.nn.functional as F
    conv = {1: F.conv1d, 2: F.conv2d}[nd]
    y = conv(x, torch.zeros(groups * 2, cin_g, *(kernel,) * nd), None, layer.stride,
             layer.padding, layer.dilation, groups)
    assert count == 3 * y[0, 0].numel()
