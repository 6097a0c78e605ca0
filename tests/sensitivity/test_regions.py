"""DRQ region calibration: thresholds, reached fractions and Omega against brute force on the
whole feature maps, streaming / determinism, formats, and the end-to-end accuracy claim."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from quantize.calibrate import f32
from quantize.data import CalibrationSet
from quantize.drq import apply_drq, drq_fake_quantize, drq_modules, region_means
from quantize.graph import find_layers, insert_input_modules
from quantize.observe import observe
from quantize.primitives import activation_scale, fake_quantize_activation
from sensitivity import zoo
from sensitivity.regions import (
    DRQMode,
    RegionConfig,
    RegionResult,
    calibrate,
)
from solver.errors import BadCalibrationError, BadConstraintsError

FRACTIONS = (0.1, 0.2, 0.3, 0.5)
# arbitrary (trace, numel) pairs: omega must be trace / numel * numel * mse = trace * mse
TRACES = {"conv1": (2.5, 1000), "conv2": (0.75, 123)}


@pytest.fixture(scope="module")
def program(cnn, digits) -> torch.export.ExportedProgram:
    return zoo.export(cnn, digits[0][:4])


@pytest.fixture(scope="module")
def split(calib_digits) -> tuple[CalibrationSet, CalibrationSet]:
    x, y = calib_digits
    return CalibrationSet((x,), labels=y).split(0.3, seed=0)


@pytest.fixture(scope="module")
def result(program, split) -> RegionResult:
    train, holdout = split
    gm = program.module()
    return calibrate(gm, find_layers(gm), train, holdout, RegionConfig(), TRACES)


def conv_inputs(program, data: CalibrationSet) -> dict[str, torch.Tensor]:
    """Every conv input on the whole data set at once (the brute-force reference)."""
    store: dict[str, torch.Tensor] = {}

    class Keep(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            store[self.name] = x.detach().clone()
            return x

    gm = program.module()
    convs = [layer for layer in find_layers(gm) if layer.kind == "conv2d"]
    insert_input_modules(gm, convs, {c.name: Keep(c.name) for c in convs}, "test")
    with torch.no_grad():
        gm(*data.args)
    return store


def test_against_brute_force_on_whole_maps(program, split, result) -> None:
    train, holdout = split
    full_train, full_hold = conv_inputs(program, train), conv_inputs(program, holdout)
    assert [layer.name for layer in result.layers] == ["conv1", "conv2"]
    for layer in result.layers:
        a, h = full_train[layer.name], full_hold[layer.name]
        scale, signed = activation_scale(float(a.min()), float(a.max()), 8)
        scale = float(np.float32(scale))  # the grid is stored in float32
        assert (layer.scale, layer.signed) == (scale, signed)
        assert layer.input_shape == tuple(a.shape[1:])
        assert len(layer.modes) == 3 * len(FRACTIONS)  # 2, 4, 8 all fit the 8x8 maps
        codes = torch.round(a / scale).clamp(0, 255)
        codes_h = torch.round(h / scale).clamp(0, 255)
        trace, n_a = TRACES[layer.name]
        for mode in layer.modes:
            means = region_means(codes, mode.region)

            def reached(t: int, means=means) -> float:
                return float((means >= t).double().mean())

            t = mode.threshold
            assert math.isclose(mode.fraction_calib, reached(t), abs_tol=1e-12)
            assert math.isclose(
                mode.fraction_holdout,
                float((region_means(codes_h, mode.region) >= t).double().mean()),
                abs_tol=1e-12,
            )
            # no other integer threshold reaches closer to the target
            gap = abs(reached(t) - mode.target_fraction)
            for other in range(0, 257):
                assert gap <= abs(reached(other) - mode.target_fraction) + 1e-12
            err = float((drq_fake_quantize(a, scale, signed, mode.region, t) - a).double()
                        .pow(2).sum())
            mse = err / a.numel()
            assert math.isclose(mode.mse, mse, rel_tol=1e-9)
            assert math.isclose(mode.omega, trace / n_a * (mse * n_a), rel_tol=1e-9)
            f = mode.mac_fraction
            assert math.isclose(mode.expected_bits, 8 * f + 4 * (1 - f))
        assert layer.omega_high < layer.omega_low
        # Same normalisation as the sensitivity engine's omega_a[a] (sensitivity/engine.py):
        # Tr / numel * ||Q_a(x) - x||^2 summed over the train inputs, numel = their count, Q_a
        # the per-tensor min/max grid at a bits.
        for bits, omega in ((8, layer.omega_high), (4, layer.omega_low)):
            s_a, signed_a = activation_scale(float(a.min()), float(a.max()), bits)
            err = float((fake_quantize_activation(a, s_a, bits, signed_a) - a).double()
                        .pow(2).sum())
            assert math.isclose(omega, trace / a.numel() * err, rel_tol=1e-6), bits


@pytest.mark.parametrize("size", [2, 4])
def test_threshold_reaches_target_fraction_on_its_data(result, size) -> None:
    # conv1's input (the digit images) has thousands of 2x2 / 4x4 regions with well spread
    # means; conv2's means pile into a few integer bins (see the module doc of regions.py).
    layer = result.layer("conv1")
    for f in FRACTIONS:
        mode = layer.mode(size, f)
        assert abs(mode.fraction_calib - f) <= 0.02, (size, f, mode)


def test_omega_grows_as_the_sensitive_fraction_shrinks(result) -> None:
    for layer in result.layers:
        for size in (2, 4, 8):
            modes = sorted(
                (m for m in layer.modes if m.region == (size, size)),
                key=lambda m: -m.fraction_calib,
            )
            for more, fewer in zip(modes, modes[1:], strict=False):
                if fewer.threshold != more.threshold:
                    assert fewer.omega > more.omega, (layer.name, more, fewer)
            assert layer.omega_high <= modes[0].omega <= modes[-1].omega <= layer.omega_low


def test_streaming_is_deterministic_and_ignores_batch_padding(
    program, split, result, cnn_fixed_batch_pt2
) -> None:
    train, holdout = split
    gm = program.module()
    layers = find_layers(gm)
    calls: list[float] = []
    small = calibrate(
        gm, layers, train, holdout, RegionConfig(batch_size=37), TRACES,
        progress=lambda stage, f: calls.append(f),
    )
    n_batches = 2 * math.ceil(len(train) / 37) + math.ceil(len(holdout) / 37)
    assert len(calls) == n_batches and calls[-1] == 1.0
    fixed_gm = torch.export.load(str(cnn_fixed_batch_pt2)).module()
    fixed = calibrate(
        fixed_gm, find_layers(fixed_gm), train, holdout, RegionConfig(), TRACES, batch_size=16
    )
    again = calibrate(gm, layers, train, holdout, RegionConfig(), TRACES)
    assert again.to_dict()["layers"] == result.to_dict()["layers"]
    for other in (small, fixed):
        for la, lb in zip(result.layers, other.layers, strict=True):
            assert (la.scale, la.signed, la.samples) == (lb.scale, lb.signed, lb.samples)
            for ma, mb in zip(la.modes, lb.modes, strict=True):
                assert (ma.region, ma.threshold, ma.fraction_calib, ma.fraction_holdout) == (
                    mb.region, mb.threshold, mb.fraction_calib, mb.fraction_holdout,
                )
                assert math.isclose(ma.omega, mb.omega, rel_tol=1e-6)


def test_handed_down_statistics_give_the_same_result(program, split, result) -> None:
    """With the job's activation statistics handed down, regions skip their own range pass
    (one pass fewer of progress) and give the same result; the grid is that of the whole train
    part even when ``max_samples`` limits the region statistics."""
    train, holdout = split
    gm = program.module()
    layers = find_layers(gm)
    stats = observe(gm, layers, train, 64)
    calls: list[float] = []
    handed = calibrate(gm, layers, train, holdout, RegionConfig(), TRACES, activations=stats,
                       progress=lambda stage, f: calls.append(f))
    assert handed.to_dict()["layers"] == result.to_dict()["layers"]
    assert len(calls) == math.ceil(len(train) / 64) + math.ceil(len(holdout) / 64)
    few = calibrate(gm, layers, train, holdout, RegionConfig(max_samples=8), TRACES)
    for layer in few.layers:
        assert layer.samples == 8
        assert layer.scale == f32(stats.grid(layer.name, 8)[0])
        assert layer.scale == result.layer(layer.name).scale


def test_raw_omega_without_traces_and_small_maps(program, split) -> None:
    train, holdout = split
    gm = program.module()
    raw = calibrate(gm, find_layers(gm), train, holdout, RegionConfig(region_sizes=(4, 16)))
    assert raw.omega_is_raw
    layer = raw.layer("conv1")
    assert {m.region for m in layer.modes} == {(4, 4)}  # 16 does not fit an 8x8 map
    mode = layer.mode(4, 0.2)
    assert math.isclose(mode.omega, mode.mse * 64 * 1 * len(train) / len(train) * 1.0)
    none_fit = calibrate(gm, find_layers(gm), train, holdout, RegionConfig(region_sizes=(9,)))
    for layer in none_fit.layers:
        assert layer.modes == []
        assert 0 < layer.omega_high < layer.omega_low  # whole-map errors are still reported


def test_errors(program, split) -> None:
    train, holdout = split
    gm = program.module()
    layers = find_layers(gm)
    with pytest.raises(ValueError, match="conv2"):
        calibrate(gm, layers, train, holdout, RegionConfig(), {"conv1": (1.0, 10)})
    empty = train.subset(torch.arange(0))
    with pytest.raises(BadCalibrationError, match="held-out"):
        calibrate(gm, layers, train, empty, RegionConfig())


def test_result_json_round_trip_and_plan_entry(result) -> None:
    text = result.to_json()
    back = RegionResult.from_json(text)
    assert back == result
    assert json.loads(text)["version"] == 2
    mode = result.layer("conv2").mode(4, 0.3)
    layer = result.layer("conv2")
    entry = layer.drq_dict(mode)
    assert entry == {
        "region": [4, 4], "threshold": mode.threshold,
        "sensitive_fraction": mode.fraction_calib, "mac_fraction": mode.mac_fraction,
        "high_bits": 8, "low_bits": 4, "scale": layer.scale, "signed": layer.signed,
    }
    assert float(np.float32(layer.scale)) == layer.scale  # stored as float32 by quantize
    assert isinstance(entry["threshold"], int)
    json.dumps(entry)
    assert mode.tag == "drq-4x4-f0.3"
    assert DRQMode.from_dict(mode.to_dict()) == mode
    with pytest.raises(ValueError, match="version"):
        RegionResult.from_dict({**result.to_dict(), "version": 1})


def test_config_round_trip_and_validation() -> None:
    cfg = RegionConfig(region_sizes=(2, 8), sensitive_fractions=(0.25,), max_samples=None)
    assert RegionConfig.from_json(cfg.to_json()) == cfg
    assert RegionConfig.from_json(RegionConfig().to_json()) == RegionConfig()
    for bad in (
        {"region_sizes": ()},
        {"region_sizes": (0, 2)},
        {"region_sizes": (2, 2)},
        {"sensitive_fractions": (0.0,)},
        {"sensitive_fractions": (1.0,)},
        {"sensitive_fractions": (float("nan"),)},
        {"low_bits": 8},
        {"max_samples": 0},
        {"batch_size": 0},
        {"version": 2},
    ):
        with pytest.raises(BadConstraintsError):
            RegionConfig(**bad)
    with pytest.raises(BadConstraintsError, match="unknown"):
        RegionConfig.from_dict({"region_size": [2]})


# ------------------------------------------------------------------------------------------
# End to end: a DRQ configuration with >= 60% of regions at INT4 keeps the accuracy of the
# all-INT8 fake-quant model within 1 point on the held-out digits.


def test_drq_option_bops_equal_the_multiplications_the_runtime_counts(program, split,
                                                                     result) -> None:
    """The solver's DRQ BOPS (and drq-array latency) of every mode and weight width equal the
    8x8 / 4x4 multiplications that ``DRQConv2d`` counts from its masks on the same data."""
    from solver import LayerSpec, Limits, OptionsConfig, build_problem
    from solver.hardware import get_profile
    from solver.options import ActivationMode

    train, _ = split
    array = get_profile("drq-array")
    layers = find_layers(program.module())
    convs = {layer.name: layer for layer in layers if layer.kind == "conv2d"}
    n = len(train)
    for layer in result.layers:
        cout, cin, kh, kw = convs[layer.name].weight_shape
        macs = cout * cin * kh * kw * 8 * 8  # 3x3 convs, padding 1, stride 1 on 8x8 maps
        modes = [ActivationMode(m.tag, m.expected_bits, m.omega, layer.drq_dict(m))
                 for m in layer.modes]
        spec = LayerSpec(layer.name, "conv2d", cout * cin * kh * kw, macs, cout,
                         math.prod(layer.input_shape), {4: 0.0, 8: 0.0}, {4: 0.0, 8: 0.0},
                         modes)
        cfg = OptionsConfig(weight_bits=(4, 8), activation_bits=(4, 8), pin_first=None,
                            pin_last=None)
        options = {o.tag: o for o in build_problem([spec], cfg, Limits()).layers[0].options}
        array_cfg = dataclasses.replace(cfg, hardware="drq-array")
        array_options = {o.tag: o for o in
                         build_problem([spec], array_cfg, Limits()).layers[0].options}
        fractions = set()
        for mode in layer.modes:
            settings = result.drq_settings({layer.name: mode})
            gm = apply_drq(program.module(), layers, settings)
            with torch.no_grad():
                gm(*train.args)
            (mod,) = drq_modules(gm).values()
            assert mod.macs_high + mod.macs_low == n * macs
            fractions.add(mod.macs_high / (n * macs))
            for w in (4, 8):
                counted = mod.macs_high * w * 8 + mod.macs_low * min(w, 4) * 4
                assert options[f"w{w}{mode.tag}"].bops * n == pytest.approx(counted, rel=1e-12)
                # drq-array: one 8x8 or four 4x4 multiplications per PE group and cycle
                cycles = (mod.macs_high + mod.macs_low / 4) / array.pe_groups
                assert array_options[f"w{w}{mode.tag}"].latency_ms * n == pytest.approx(
                    cycles / array.clock_hz * 1e3, rel=1e-12)
        # the counts are not one fraction in disguise: the modes differ, and padding taps make
        # the MAC fraction differ from the region fraction
        assert len(fractions) > 3
        assert any(abs(m.mac_fraction - m.fraction_calib) > 1e-3 for m in layer.modes)


@pytest.fixture(scope="module")
def drq_cnn(digits) -> torch.nn.Module:
    """A digits CNN like the shared fixture, but seeded at initialisation (the shared one's init
    depends on the RNG state when it is first requested) and trained 30 epochs instead of 15:
    the 15-epoch nets vary from 82% to 95% accuracy with the init seed, and some collapse when
    conv1's 3x3x1 kernels go to 4 bits (bench/drq.py prints the spread over seeds)."""
    x, y = digits
    torch.manual_seed(0)
    model = zoo.DigitsCNN(width=8)
    return zoo.train(model, x[:1400], y[:1400], epochs=30, seed=0)


def test_drq_keeps_int8_accuracy_with_most_regions_at_int4(drq_cnn, digits, calib_digits) -> None:
    x, y = digits
    xh, yh = calib_digits
    program = zoo.export(drq_cnn, x[:4])
    layers = find_layers(program.module())
    # Calibrate on training digits (what a user would send); the held-out digits only judge.
    train = CalibrationSet((x[:256],), labels=y[:256])
    holdout = CalibrationSet((xh,), labels=yh)
    cfg = RegionConfig(region_sizes=(2, 4), sensitive_fractions=(0.3, 0.4))
    res = calibrate(program.module(), layers, train, holdout, cfg)
    # Rule fixed in advance: the finest region size and the largest candidate fraction whose
    # calibrated fraction leaves at least 60% of the regions at INT4 in every layer.
    ok = [f for f in cfg.sensitive_fractions
          if all(layer.mode(2, f).fraction_calib <= 0.4 for layer in res.layers)]
    choice = {layer.name: layer.mode(2, max(ok)) for layer in res.layers}
    int8 = {n: dataclasses.replace(s, threshold=0) for n, s in res.drq_settings(choice).items()}

    def accuracy(settings) -> tuple[float, float]:
        gm = apply_drq(program.module(), layers, settings)
        with torch.no_grad():
            acc = float((gm(xh).argmax(dim=1) == yh).float().mean())
        mods = drq_modules(gm).values()
        low = sum(m.int4_regions for m in mods) / sum(m.total_regions for m in mods)
        return acc, low

    acc8, low8 = accuracy(int8)
    acc_drq, low = accuracy(res.drq_settings(choice))
    assert low8 == 0.0
    assert low >= 0.6, low
    assert acc_drq >= acc8 - 0.01, (acc_drq, acc8, low)
