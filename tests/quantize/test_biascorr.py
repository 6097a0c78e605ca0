"""Bias correction: the measured output shift is exact, and the corrected bias is what the
checkpoint, fake-quant and the integer executor compute with."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from quantize import QuantizeConfig, apply
from quantize.biascorr import output_shifts, weight_delta
from quantize.data import CalibrationSet
from quantize.fold import fold_layers
from quantize.graph import find_layers
from quantize.integer import IntegerExecutor
from quantize.points import Grid
from quantize.primitives import fake_quantize_activation


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1, stride=2)
        self.fc = nn.Linear(5 * 4 * 4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("fixed", [False, True])
def test_output_shift_equals_the_weight_error_on_the_mean_input(fixed) -> None:
    """``E[op(x, dW)]`` per channel equals ``op(E[x], dW)`` (the op is linear in x), computed in
    another order: the mean input first. With fixed batches (10 samples in batches of 4) the
    padding rows must not count."""
    torch.manual_seed(0)
    model = _Small().eval()
    x = torch.randn(10, 2, 8, 8) + 0.5
    gm = torch.export.export(model, (x[:4],),
                             dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    layers = {layer.name: layer for layer in find_layers(gm)}
    folded = fold_layers(gm, list(layers.values()))
    deltas = {n: weight_delta(w, 3, None) for n, (w, _) in folded.items()}
    got = output_shifts(gm, layers, deltas, CalibrationSet((x,)), 4, fixed=fixed)
    xd = x.to(torch.float64)
    conv_ref = nn.functional.conv2d(xd.mean(0, keepdim=True), deltas["conv"], None, 2, 1)
    torch.testing.assert_close(got["conv"], conv_ref.mean((0, 2, 3)), rtol=1e-9, atol=1e-12)
    h = torch.relu(model.conv(x)).flatten(1).to(torch.float64)
    torch.testing.assert_close(got["fc"], deltas["fc"] @ h.mean(0), rtol=1e-6, atol=1e-9)
    assert float(got["conv"].abs().max()) > 1e-3  # a real shift at 3 bits, not zero
    # with the conv's input grid: E[op(Q_a(x), W + dW) - op(x, W)], summed directly
    grid = Grid(0.05, 4, True)
    w = folded["conv"][0].to(torch.float64)
    got = output_shifts(gm, layers, {"conv": deltas["conv"]}, CalibrationSet((x,)), 4, fixed,
                        weights={"conv": w}, grids={"conv": grid})
    xq = fake_quantize_activation(xd, 0.05, 4, True)
    ref = (nn.functional.conv2d(xq, w + deltas["conv"], None, 2, 1)
           - nn.functional.conv2d(xd, w, None, 2, 1)).mean((0, 2, 3))
    torch.testing.assert_close(got["conv"], ref, rtol=1e-9, atol=1e-12)


def _first_layer_shift(res, program, x: torch.Tensor) -> torch.Tensor:
    """Per output channel: mean over ``x`` of (quantized first layer - float first layer); the
    quantized one with the checkpoint's weight and bias on the fake-quantized input."""
    ckpt = res.checkpoint
    layer = find_layers(program.module())[0]
    name = layer.name
    t = ckpt.tensors
    s_w = t[f"{name}.weight_scale"].to(torch.float64)
    g = ckpt.input_grid(name)
    bias_q = t[f"{name}.bias_q"].to(torch.float64) * s_w * g.scale
    xq = fake_quantize_activation(x, g.scale, g.bits, g.signed).to(torch.float64)
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    q = nn.functional.conv2d(xq, ckpt.dequantized_weight(name).to(torch.float64), bias_q, *args)
    gm = program.module()
    w, b = fold_layers(gm, [layer])[name]  # the float layer with its BatchNorm folded in
    f = nn.functional.conv2d(x.to(torch.float64), w.to(torch.float64),
                             None if b is None else b.to(torch.float64), *args)
    return (q - f).mean((0, 2, 3))


def test_bias_correction_removes_the_first_layers_mean_shift(cnn_program, plan_for,
                                                             split) -> None:
    """At 3-bit weights and 4-bit inputs the CNN's first conv shifts its output channels'
    means; with either correction the shift left is the rounding of the integer bias."""
    plan = plan_for(cnn_program, w_bits=3, a_bits=4)
    train, _ = split
    x = train.args[0]
    res = {m: apply(cnn_program, plan, train, train, QuantizeConfig(bias_correction=m))
           for m in ("none", "weight", "layer")}
    shift = {m: float(_first_layer_shift(r, cnn_program, x).abs().mean()) for m, r in res.items()}
    # measured: a mean |shift| 0.108 without, 0.0097 with either (11x; 5x asked). What is
    # left is the rounding of bias_q to the accumulator unit S_w S_in (large at 3-bit weights
    # and a 4-bit input grid); the input's own rounding shift is smaller (the digits lie on
    # a 1/16 grid the 4-bit grid nearly matches), so "layer" rounds to "weight"'s bias_q.
    assert shift["weight"] < 0.2 * shift["none"]
    assert shift["layer"] < 0.2 * shift["none"]
    # only the bias changes
    name = find_layers(cnn_program.module())[0].name
    off, on = res["none"], res["weight"]
    assert torch.equal(on.tensors[f"{name}.weight_q"], off.tensors[f"{name}.weight_q"])
    assert not torch.equal(on.tensors[f"{name}.bias"], off.tensors[f"{name}.bias"])
    assert on.report["config"]["bias_correction"] == "weight"


@pytest.mark.parametrize(("model", "mode"), [("cnn", "weight"), ("resnet", "layer")])
def test_integer_executor_matches_fake_quant_with_correction(model, mode, request, plan_for,
                                                             split, tmp_path) -> None:
    """The corrected bias travels through the checkpoint: the integer executor (which adds
    ``bias_q``) and fake-quant agree as in test_integer.py (same one-LSB bound and counts)."""
    program = request.getfixturevalue(f"{model}_program")
    plan = plan_for(program, w_bits=lambda i, _: 4 if i % 2 == 0 else 8,
                    a_bits=lambda i, _: 4 if i == 1 else 8)
    res = apply(program, plan, *split, cfg=QuantizeConfig(bias_correction=mode))
    path = res.save(tmp_path / "m.safetensors")
    out = IntegerExecutor.from_checkpoint(path, program)(split[1].args[0])
    with torch.no_grad():
        fq = res.module(split[1].args[0])
    lsb = (out.codes.to(torch.float64) - torch.round(fq.to(torch.float64) / out.grid.scale)).abs()
    assert float(lsb.max()) <= 1.0
    assert int((lsb > 0).sum()) <= 12 and lsb.numel() >= 2000


def test_config_rejects_an_unknown_mode() -> None:
    from solver.errors import BadConstraintsError

    with pytest.raises(BadConstraintsError, match="bias_correction"):
        QuantizeConfig(bias_correction=True)  # type: ignore[arg-type]
    assert QuantizeConfig.from_dict({"bias_correction": "layer"}).bias_correction == "layer"


class _Shapes(nn.Module):
    """Convs with stride / padding / dilation / groups (depthwise too), a 1-D conv and a linear
    layer on [B, T, D] rows: every way a tap sees padding zeros or a strided window."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6)  # depthwise
        self.c3 = nn.Conv2d(6, 4, (3, 1), stride=(1, 2), padding=(1, 0), groups=2, bias=False)
        self.c4 = nn.Conv2d(4, 4, 3, padding=3)  # more padding than the kernel reaches
        self.t1 = nn.Conv1d(4, 5, 2, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c4(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))  # [B, 4, 8, 6]
        t = self.t1(h[:, :, :2, :4].flatten(2))  # [B, 5, 5]
        return self.fc(torch.tanh(t).transpose(1, 2))  # [B, 5 tokens, 3]


@pytest.mark.parametrize("fixed", [False, True])
def test_input_sums_give_the_pass_based_shift(fixed) -> None:
    """``E[op(x, dW)]`` from the per-tap input sums of one observe pass equals the pass that
    runs ``op(x, dW)`` on every sample in float64, for every layer shape above (1e-5 relative:
    the sums add a batch's rows in float32 first, measured 5e-7 off); fixed batches (11 samples
    in 4s) drop the padding rows in both."""
    from quantize.observe import observe

    torch.manual_seed(0)
    x = torch.randn(11, 4, 8, 8) + 0.3  # a non-zero mean, so the padding taps matter
    gm = torch.export.export(_Shapes().eval(), (x[:4],),
                             dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    layers = {layer.name: layer for layer in find_layers(gm)}
    assert set(layers) == {"c1", "c2", "c3", "c4", "t1", "fc"}
    params = dict(gm.named_parameters())
    deltas = {n: weight_delta(params[layer.weight], 3, None) for n, layer in layers.items()}
    data = CalibrationSet((x,))
    passed = output_shifts(gm, layers, deltas, data, 4, fixed=fixed)
    stats = observe(gm, list(layers.values()), data, 4, fixed)
    for name, delta in deltas.items():
        got = stats.sums[name].mean_output(delta)
        torch.testing.assert_close(got, passed[name], rtol=1e-5, atol=1e-9)
        assert float(got.abs().max()) > 1e-4  # a real shift at 3 bits (far above the atol)
    assert stats.sums["fc"].count == 11 * 5  # rows of every token
    assert stats.sums["c1"].count == 11 * 4 * 4  # samples x output positions


def test_correction_from_sums_equals_the_pass_on_the_folded_model(resnet_program, plan_for,
                                                                  split) -> None:
    """The checkpoint with the sums of the unfolded program (the job's observe pass) has the
    biases of the pass on the BN-folded float model: the layer inputs differ only by the
    rounding of the folded BN (measured 1.8e-7 relative, two float32 steps; 2e-6 allowed), and
    every other tensor is equal."""
    from quantize.observe import observe

    plan = plan_for(resnet_program, w_bits=lambda i, _: 4 if i % 2 == 0 else 8)
    train, holdout = split
    gm = resnet_program.module()
    stats = observe(gm, find_layers(gm), train, 64)
    with_sums = apply(resnet_program, plan, train, holdout, activations=stats)
    no_sums = dataclasses.replace(stats, sums={})
    passed = apply(resnet_program, plan, train, holdout, activations=no_sums)
    none = apply(resnet_program, plan, train, holdout, QuantizeConfig(bias_correction="none"),
                 activations=no_sums)
    moved, biases = 0, 0
    for key, t in with_sums.tensors.items():
        if key.endswith(".bias"):
            torch.testing.assert_close(t, passed.tensors[key], rtol=2e-6, atol=1e-7)
            moved += int(not torch.equal(t, none.tensors[key]))
            biases += 1
        elif not key.endswith(".bias_q"):
            assert torch.equal(t, passed.tensors[key]), key
    assert moved == biases == 4  # the correction changed every bias (by 0.01-0.3 here)
    q = [k for k in with_sums.tensors if k.endswith(".bias_q")]
    diff = sum(int((with_sums.tensors[k] != passed.tensors[k]).sum()) for k in q)
    assert diff <= 2  # an integer bias on a rounding tie may flip by one unit


class _CountingSet(CalibrationSet):
    """A calibration set that counts the passes made over it."""

    passes = 0

    def batches(self, batch_size, fixed=False):
        type(self).passes += 1
        return super().batches(batch_size, fixed)


def test_a_second_plan_reuses_the_measurements(resnet_program, plan_for, split) -> None:
    """A Pareto point quantized with the first plan's measurements (activation statistics with
    input sums and free-point ranges, FP32 reference outputs) makes no pass over the train set
    and gives the checkpoint and metrics of a fresh ``apply``."""
    from quantize.evaluate import reference_outputs

    train, holdout = split
    counted = _CountingSet(train.args, train.kwargs, train.labels)
    first = apply(resnet_program, plan_for(resnet_program, w_bits=8), counted, holdout)
    assert first.activations is not None and first.activations.outputs
    point = plan_for(resnet_program, w_bits=lambda i, _: 4 if i % 3 == 0 else 8)
    fresh = apply(resnet_program, point, counted, holdout)
    ref = reference_outputs(resnet_program.module(), holdout, 64)
    _CountingSet.passes = 0
    reused = apply(resnet_program, point, counted, holdout, activations=first.activations,
                   reference=ref)
    assert _CountingSet.passes == 0
    assert fresh.tensors.keys() == reused.tensors.keys()
    for key, t in fresh.tensors.items():
        assert torch.equal(t, reused.tensors[key]), key
    assert fresh.checkpoint.quant == reused.checkpoint.quant
    assert fresh.report["metrics"] == reused.report["metrics"]
