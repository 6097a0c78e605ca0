"""Bias-corrected weight Omega (sensitivity/meanshift.py): the mean shift against a direct
computation, the kept share against the exact Gauss-Newton ratio, and the corrected Omega
against the loss increase of the corrected quantized layer evaluated directly."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from layer_hooks import layer_input

from quantize.primitives import fake_quantize_weight
from sensitivity.engine import WEIGHT_BITS, SensitivityResult, measure
from sensitivity.hessian import HessianConfig
from sensitivity.intake import IntakeConfig, intake
from sensitivity.meanshift import ErrorMoments, MeanShiftParams, gauss_newton_kept

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = HessianConfig(max_iter=24, min_iter=8, tol=0.05, seed=0)


@pytest.fixture(scope="module")
def kl_intake(cnn_pt2, calib_unlabelled_path):
    """The digits CNN with a label-free calibration set: the loss is the KL to the FP32
    outputs, zero with zero gradient at the FP32 point, so a layer's loss increase is
    second order and Omega's scale applies to it directly."""
    return intake(cnn_pt2, calib_unlabelled_path, IntakeConfig(holdout_fraction=0.2, seed=0))


@pytest.fixture(scope="module")
def results(kl_intake):
    return (measure(kl_intake, FAST), measure(kl_intake, FAST, bias_correction="weight"))


def _error(module: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """op(x, delta) rows x output channels, straight from torch.nn.functional."""
    if isinstance(module, torch.nn.Conv2d):
        y = F.conv2d(x, delta, None, module.stride, module.padding)
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return F.linear(x, delta)


def _direct_mean(model, name: str, x: torch.Tensor, bits: int) -> torch.Tensor:
    module = model.get_submodule(name)
    w = module.weight.detach().double()
    xin = layer_input(model, name, x).double()
    return _error(module, xin, fake_quantize_weight(w, bits) - w).mean(0)


def _shifted(model, name: str, bits: int, x: torch.Tensor) -> torch.nn.Module:
    """A copy with ``name``'s weight on the b-bit grid and its output minus the mean shift
    (what the corrected checkpoint computes for that layer alone)."""
    mu = _direct_mean(model, name, x, bits).float()
    out = copy.deepcopy(model)
    module = out.get_submodule(name)
    with torch.no_grad():
        module.weight.copy_(fake_quantize_weight(module.weight, bits))
    shape = [1, -1, 1, 1] if isinstance(module, torch.nn.Conv2d) else [1, -1]
    module.register_forward_hook(lambda m, i, o: o - mu.reshape(shape))
    return out


def test_mean_shift_is_the_mean_output_error(cnn, kl_intake):
    """ErrorMoments (the observer the activation pass carries) on the graph's layer inputs
    equals op(x, Q(W) - W) averaged over samples and positions, computed from the nn.Module."""
    x = kl_intake.train.args[0]
    for info in kl_intake.layers:
        weight = dict(kl_intake.module.named_parameters())[info.graph.weight]
        moments = ErrorMoments(info.graph, weight, (2, 4, 8))
        moments(layer_input(cnn, info.name, x))
        for bits in (2, 4, 8):
            expected = _direct_mean(cnn, info.name, x, bits)
            # float32 layer op against the float64 reference: 1e-6 of the largest mean
            tol = 1e-6 + 1e-4 * float(expected.abs().max())
            assert torch.allclose(moments.mean(bits), expected, atol=tol, rtol=1e-4)


def test_kept_share_is_the_gauss_newton_ratio(cnn, kl_intake):
    """``kept`` against the exact ratio v^T G v / dW^T G dW, G the Gauss-Newton matrix of the
    KL loss (diag(p) - p p^T per sample) and v = (dW, -mu), from central differences of the
    float64 model's logits along each perturbation."""
    data = kl_intake.train.subset(torch.arange(48))
    x = data.args[0]
    model = copy.deepcopy(cnn).double().eval()
    with torch.no_grad():
        p = F.softmax(model(x.double()), -1)

    def quad(name: str, bits: int, corrected: bool) -> float:
        module = model.get_submodule(name)
        w = module.weight.detach().clone()
        dw = fake_quantize_weight(w, bits) - w
        mu = _direct_mean(cnn, name, data.args[0], bits).double()
        shape = [1, -1, 1, 1] if isinstance(module, torch.nn.Conv2d) else [1, -1]
        t = {"t": 0.0}
        handle = module.register_forward_hook(
            lambda m, i, o: o - t["t"] * mu.reshape(shape) if corrected else o)
        outs = []
        with torch.no_grad():
            for s in (1e-4, -1e-4):
                module.weight.copy_(w + s * dw)
                t["t"] = s
                outs.append(model(x.double()))
            module.weight.copy_(w)
        handle.remove()
        jv = (outs[0] - outs[1]) / 2e-4
        return float((p * jv.pow(2)).sum() - (p * jv).sum(-1).pow(2).sum())

    means = {info.name: {b: _direct_mean(cnn, info.name, x, b) for b in (2, 4)}
             for info in kl_intake.layers}
    kept = gauss_newton_kept(kl_intake.module, [i.graph for i in kl_intake.layers], data,
                             "kl", means, chunk=48, params=MeanShiftParams(probes=800))
    for info in kl_intake.layers:
        for bits in (2, 4):
            exact = quad(info.name, bits, True) / quad(info.name, bits, False)
            # 800 probes of 16 drawn digits, 10 seeds: relative error sd <= 0.085 per option
            # (worst draw 0.135; the exact ratios 0.04..0.24); 0.3 relative is > 3.5 sd
            assert kept[info.name][bits] == pytest.approx(exact, rel=0.3, abs=0.01), (
                info.name, bits)


def test_corrected_omega_tracks_the_corrected_loss_increase(cnn, kl_intake, results):
    """On the digits CNN the corrected layer's loss increase (weights on the grid, output
    minus its mean shift, evaluated directly) is what the corrected Omega estimates: its
    mean |log ratio| over every layer and width is far below the uncorrected Omega's."""
    raw, corrected = results
    x = kl_intake.train.args[0]
    with torch.no_grad():
        logp = F.log_softmax(cnn(x), -1)

    def increase(model) -> float:
        with torch.no_grad():
            logq = F.log_softmax(model(x), -1)
        return 2 * float((logp.exp() * (logp - logq)).sum(-1).mean())

    err_raw, err_corrected = [], []
    for info in kl_intake.layers:
        for bits in WEIGHT_BITS:
            exact = increase(_shifted(cnn, info.name, bits, x))
            assert exact > 0
            err_raw.append(abs(math.log(raw.layer(info.name).omega_w[bits] / exact)))
            err_corrected.append(
                abs(math.log(corrected.layer(info.name).omega_w[bits] / exact)))
    mean_raw = sum(err_raw) / len(err_raw)
    mean_corrected = sum(err_corrected) / len(err_corrected)
    # measured: 2.17 (the uncorrected Omega ~9x too large) against 0.61; the bound (1.30 here)
    # leaves a 2x margin on either side
    assert mean_corrected < 0.6 * mean_raw, (mean_corrected, mean_raw)


def test_corrected_omega_is_the_uncorrected_times_kept(results):
    raw, corrected = results
    assert raw.config["bias_correction"] == "none"
    assert corrected.config["bias_correction"] == "weight"
    for a, b in zip(raw.layers, corrected.layers, strict=True):
        assert a.omega_w_kept == {} and set(b.omega_w_kept) == set(WEIGHT_BITS)
        for bits in WEIGHT_BITS:
            assert 0.0 <= b.omega_w_kept[bits]
            assert b.omega_w[bits] == pytest.approx(a.omega_w[bits] * b.omega_w_kept[bits],
                                                    rel=1e-9)
        assert b.omega_a == a.omega_a  # the weight correction leaves activations alone


def test_version_3_round_trip_and_version_2_read(results):
    _, res = results
    d = json.loads(res.to_json())
    assert d["version"] == 3 and d["config"]["bias_correction"] == "weight"
    back = SensitivityResult.from_json(res.to_json())
    assert back.to_json() == res.to_json()
    assert back.layers[0].omega_w_kept == res.layers[0].omega_w_kept
    # a version-2 file (no kept shares) is read with empty ones
    d["version"] = 2
    for row in d["layers"]:
        del row["omega_w_kept"]
    old = SensitivityResult.from_dict(d)
    assert all(layer.omega_w_kept == {} for layer in old.layers)


def test_bad_bias_correction(kl_intake):
    with pytest.raises(ValueError, match="bias_correction"):
        measure(kl_intake, FAST, bias_correction="bias")
