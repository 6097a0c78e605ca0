"""Bias correction: the measured output shift is exact, and the corrected bias is what the
checkpoint, fake-quant and the integer executor compute with."""

from __future__ import annotations

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
